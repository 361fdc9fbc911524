"""Secrets API through Pilot against a real, unsealed Nexus (SQLite): versions, pruning,
soft delete / undelete / destroy, check-and-set, path grammar and size limits, import,
and the JSON output shapes documented in the README."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DevAgent, Nexus, pilot, pilot_json, short_tmpdir, start_unsealed

MAX_VERSIONS = 3
VALUE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxs-")
    running = start_unsealed(agent, data_dir, ["--max-secret-versions", str(MAX_VERSIONS)])
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def spike(agent: DevAgent, server: Nexus, *args: str, stdin: str | None = None) -> Any:
    return pilot(list(args), agent.env("pilot"), server, stdin=stdin)


def sj(agent: DevAgent, server: Nexus, *args: str) -> dict[str, Any]:
    return pilot_json([*args, "--output", "json"], agent.env("pilot"), server)


def db_rows(data_dir: Path, path: str) -> list[tuple[int, bool]]:
    """(version, has_blob) of a secret's rows, read straight from SQLite, read-only."""
    uri = f"file:{data_dir / 'spike.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        rows = conn.execute(
            "SELECT version, blob IS NOT NULL FROM records WHERE kind = 'secret' AND path = ? "
            "ORDER BY version", (path,)).fetchall()
    return [(int(v), bool(b)) for v, b in rows]


# ---------------------------------------------------------------- versions and pruning


def test_versions_are_pruned_to_the_maximum(agent: DevAgent, server: Nexus) -> None:
    for i in range(1, 6):
        out = sj(agent, server, "secret", "put", "app/db", f"user=u{i}", "pass=p")
        assert out == {"path": "app/db", "version": i}
    meta = sj(agent, server, "secret", "metadata", "app/db")
    assert set(meta) >= {"path", "current_version", "oldest_version", "created", "updated",
                         "versions"}
    assert meta["path"] == "app/db"
    assert meta["current_version"] == 5 and meta["oldest_version"] == 3
    assert [v["version"] for v in meta["versions"]] == [3, 4, 5]
    for v in meta["versions"]:
        assert set(v) == {"version", "created", "deleted", "destroyed"}
        assert v["deleted"] is None and v["destroyed"] is False
    # The pruned rows are really gone from the database, not merely hidden.
    assert db_rows(server.data_dir, "app/db") == [(3, True), (4, True), (5, True)]

    got = sj(agent, server, "secret", "get", "app/db")
    assert got == {"path": "app/db", "version": 5, "data": {"user": "u5", "pass": "p"}}
    assert sj(agent, server, "secret", "get", "app/db", "--version", "4")["data"]["user"] == "u4"
    gone = spike(agent, server, "secret", "get", "app/db", "--version", "1")
    assert gone.returncode == 6, gone.stderr
    field = spike(agent, server, "secret", "get", "app/db", "--field", "user")
    assert field.returncode == 0 and field.stdout == "u5"
    assert sj(agent, server, "secret", "get", "app/db", "--field", "pass") == {
        "path": "app/db", "version": 5, "data": {"pass": "p"}}
    text = spike(agent, server, "secret", "get", "app/db")
    assert text.returncode == 0 and "user=u5" in text.stdout.splitlines()


def test_missing_secret_is_not_found(agent: DevAgent, server: Nexus) -> None:
    for args in (["get", "no/such"], ["metadata", "no/such"], ["delete", "no/such"],
                 ["destroy", "no/such", "--version", "1"]):
        result = spike(agent, server, "secret", *args)
        assert result.returncode == 6, (args, result.stderr)


def test_delete_undelete_destroy(agent: DevAgent, server: Nexus) -> None:
    sj(agent, server, "secret", "put", "life/cycle", "k=one")
    sj(agent, server, "secret", "put", "life/cycle", "k=two")

    out = sj(agent, server, "secret", "delete", "life/cycle")
    assert out["path"] == "life/cycle" and out["result"] == "deleted"
    deleted = spike(agent, server, "secret", "get", "life/cycle")
    assert deleted.returncode == 6 and "deleted" in deleted.stderr
    meta = sj(agent, server, "secret", "metadata", "life/cycle")
    by_version = {v["version"]: v for v in meta["versions"]}
    assert by_version[2]["deleted"] is not None and by_version[1]["deleted"] is None
    # Soft delete keeps the ciphertext.
    assert db_rows(server.data_dir, "life/cycle") == [(1, True), (2, True)]

    out = sj(agent, server, "secret", "undelete", "life/cycle", "--version", "2")
    assert out == {"path": "life/cycle", "versions": [2], "result": "undeleted"}
    assert sj(agent, server, "secret", "get", "life/cycle")["data"] == {"k": "two"}

    # undelete/destroy need explicit versions (a usage error in Pilot).
    assert spike(agent, server, "secret", "destroy", "life/cycle").returncode == 2

    out = sj(agent, server, "secret", "destroy", "life/cycle", "--version", "1")
    assert out == {"path": "life/cycle", "versions": [1], "result": "destroyed"}
    gone = spike(agent, server, "secret", "get", "life/cycle", "--version", "1")
    assert gone.returncode == 6 and "destroyed" in gone.stderr
    meta = sj(agent, server, "secret", "metadata", "life/cycle")
    assert {v["version"]: v["destroyed"] for v in meta["versions"]} == {1: True, 2: False}
    # Destroy is permanent: the ciphertext is gone from the row.
    assert db_rows(server.data_dir, "life/cycle") == [(1, False), (2, True)]
    # Undelete cannot bring a destroyed version back, whatever it answers.
    spike(agent, server, "secret", "undelete", "life/cycle", "--version", "1")
    assert spike(agent, server, "secret", "get", "life/cycle",
                 "--version", "1").returncode == 6
    assert sj(agent, server, "secret", "get", "life/cycle")["data"] == {"k": "two"}


def test_check_and_set(agent: DevAgent, server: Nexus) -> None:
    assert sj(agent, server, "secret", "put", "cas/x", "v=1", "--cas", "0")["version"] == 1
    again = spike(agent, server, "secret", "put", "cas/x", "v=again", "--cas", "0")
    assert again.returncode == 7, again.stderr
    assert "check-and-set" in again.stderr
    assert sj(agent, server, "secret", "put", "cas/x", "v=2", "--cas", "1")["version"] == 2
    stale = spike(agent, server, "secret", "put", "cas/x", "v=stale", "--cas", "1")
    assert stale.returncode == 7
    ahead = spike(agent, server, "secret", "put", "cas/x", "v=ahead", "--cas", "9")
    assert ahead.returncode == 7
    assert sj(agent, server, "secret", "get", "cas/x")["data"] == {"v": "2"}
    assert spike(agent, server, "secret", "put", "cas/x", "v=1", "--cas", "-1").returncode == 2


# ---------------------------------------------------------------- grammar and limits


@pytest.mark.parametrize(("path", "words"), [
    ("app/../db", "'..'"),
    ("./db", "'.'"),
    ("app//db", "empty segment"),
    ("/app", "empty segment"),
    ("app/", "empty segment"),
    ("app/d b", "letters, digits"),
    ("app/d$b", "letters, digits"),
    ("app/dé", "letters, digits"),
    ("a/" * 300 + "b", "longer than 512"),
    ("a" * 129, "longer than 128"),
])
def test_path_grammar_errors(agent: DevAgent, server: Nexus, path: str, words: str) -> None:
    result = spike(agent, server, "secret", "put", path, "k=v")
    assert result.returncode == 2, (path, result.stderr)
    assert words in result.stderr, result.stderr


def test_value_size_limit(agent: DevAgent, server: Nexus, tmp_path: Path) -> None:
    # Exactly at the limit (keys + values, UTF-8 bytes) is accepted, one byte more is not.
    (tmp_path / "max").write_text("x" * (VALUE_LIMIT - 1))
    ok = sj(agent, server, "secret", "put", "big/max", f"k=@{tmp_path / 'max'}")
    assert ok["version"] == 1
    assert len(sj(agent, server, "secret", "get", "big/max")["data"]["k"]) == VALUE_LIMIT - 1
    (tmp_path / "over").write_text("x" * VALUE_LIMIT)
    over = spike(agent, server, "secret", "put", "big/over", f"k=@{tmp_path / 'over'}")
    assert over.returncode == 2, over.stderr
    assert "exceed 65536 bytes" in over.stderr
    # Far above the limit: refused too (by the size check or gRPC's message limit), never
    # stored.
    (tmp_path / "huge").write_text("x" * (2 * 1024 * 1024))
    huge = spike(agent, server, "secret", "put", "big/huge", f"k=@{tmp_path / 'huge'}")
    assert huge.returncode != 0
    assert spike(agent, server, "secret", "get", "big/huge").returncode == 6
    # Nexus is still healthy.
    assert sj(agent, server, "secret", "get", "big/max")["version"] == 1


def test_bad_key_value_arguments(agent: DevAgent, server: Nexus) -> None:
    assert spike(agent, server, "secret", "put", "k/v", "novalue").returncode == 2
    assert spike(agent, server, "secret", "put", "k/v", "=v").returncode == 2
    assert spike(agent, server, "secret", "put", "k/v", "a=1", "a=2").returncode == 2


def test_value_from_stdin_and_empty_value(agent: DevAgent, server: Nexus) -> None:
    out = spike(agent, server, "secret", "put", "in/stdin", "k=-", "e=", stdin="line1\nline2\n")
    assert out.returncode == 0, out.stderr
    got = sj(agent, server, "secret", "get", "in/stdin")
    assert got["data"] == {"k": "line1\nline2\n", "e": ""}


# ---------------------------------------------------------------- list and import


def test_list(agent: DevAgent, server: Nexus) -> None:
    for path in ("ls/a/one", "ls/a/two", "ls/b", "lsx"):
        sj(agent, server, "secret", "put", path, "k=v")
    listed = sj(agent, server, "secret", "list", "ls/")
    assert listed == {"paths": ["ls/a/one", "ls/a/two", "ls/b"]}
    assert sj(agent, server, "secret", "list", "ls/a/")["paths"] == ["ls/a/one", "ls/a/two"]
    everything = sj(agent, server, "secret", "list")["paths"]
    assert {"ls/a/one", "lsx", "app/db"} <= set(everything)
    text = spike(agent, server, "secret", "list", "ls/")
    assert text.stdout.splitlines() == ["ls/a/one", "ls/a/two", "ls/b"]
    assert spike(agent, server, "secret", "list", "ls/../").returncode == 2


def test_import(agent: DevAgent, server: Nexus, tmp_path: Path) -> None:
    lines = [
        json.dumps({"path": "imp/one", "data": {"user": "a", "pass": "ünïcødé"}}),
        "{not json",
        json.dumps({"path": "imp/two", "data": {"k": "v"}}),
        json.dumps({"path": "imp/../bad", "data": {"k": "v"}}),
        "",
        json.dumps({"path": "imp/three", "data": {"k": 3}}),
        json.dumps({"path": "imp/four", "data": {"a": "1", "b": ""}}),
    ]
    src = tmp_path / "import.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = spike(agent, server, "secret", "import", "--file", str(src), "--output", "json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"imported": 3, "failed": 3}
    assert "line 2" in result.stderr and "line 4" in result.stderr and "line 6" in result.stderr
    assert "'..'" in result.stderr
    assert sj(agent, server, "secret", "get", "imp/one")["data"] == {"user": "a",
                                                                      "pass": "ünïcødé"}
    assert sj(agent, server, "secret", "get", "imp/four")["data"] == {"a": "1", "b": ""}
    assert spike(agent, server, "secret", "get", "imp/three").returncode == 6

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"path": "imp/five", "data": {"x": "y"}}) + "\n")
    ok = spike(agent, server, "secret", "import", "--file", str(good))
    assert ok.returncode == 0 and "imported 1 secret(s), 0 failed" in ok.stderr
    missing = spike(agent, server, "secret", "import", "--file", str(tmp_path / "nope"))
    assert missing.returncode == 2

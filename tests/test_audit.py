"""The audit trail's hash chain: any edit, deletion, insertion or reordering is detected."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.audit import AuditLog
from spike import audit_chain
from spike.audit_chain import verify_lines
from tests.harness import base_env, pilot


def write_trail(path: Path, n: int = 5) -> list[str]:
    log = AuditLog(str(path))
    for i in range(n):
        log.record("secret.get", caller=f"spiffe://spike.internal/w{i}", target=f"apps/{i}",
                   outcome="ok")
    log.close()
    return path.read_text().splitlines()


def verify_cli(path: Path) -> tuple[int, str]:
    result = pilot(["audit", "verify", str(path), "--output", "json"], base_env())
    return result.returncode, result.stdout


def test_intact_trail_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path)
    assert verify_lines(lines).ok
    code, out = verify_cli(path)
    assert code == 0 and json.loads(out)["lines"] == 5


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_trail(path, 3)
    write_trail(path, 2)  # a restarted Nexus appends to the same file
    report = verify_lines(path.read_text().splitlines())
    assert report.ok and report.lines == 5


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "insert", "truncate_json"])
def test_tampering_is_detected(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path)
    if tamper == "edit":
        event = json.loads(lines[2])
        event["outcome"] = "denied"
        lines[2] = json.dumps(event, sort_keys=True, separators=(",", ":"))
    elif tamper == "delete":
        del lines[2]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "insert":
        lines.insert(3, lines[1])
    else:
        lines[4] = lines[4][:-10]
    path.write_text("\n".join(lines) + "\n")
    report = verify_lines(lines)
    assert not report.ok
    assert report.bad_line in (2, 3, 4, 5)
    code, out = verify_cli(path)
    assert code == 1
    assert json.loads(out)["ok"] is False


def test_deleting_the_last_line_needs_an_anchor(tmp_path: Path) -> None:
    """A chain alone cannot tell a truncated tail; Nexus anchors the head in its logs."""
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path)
    assert verify_lines(lines[:-1]).ok  # documented limitation, see README security notes


def test_request_fields_are_bounded(tmp_path: Path) -> None:
    """Audited before validation: a caller must not grow the trail by megabytes a call."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.record("secret.delete", caller="spiffe://spike.internal/w", target="p" * 200_000,
               outcome="invalid_argument", versions=list(range(100_000)))
    log.close()
    line = path.read_text()
    assert len(line) < 3_000
    event = json.loads(line)
    assert len(event["target"].encode()) <= 2048
    assert event["target"].endswith("(200000 bytes)")
    assert event["detail"]["versions"][-1] == "...(100000 items)"
    assert verify_lines([line]).ok


def test_concurrent_writers_keep_one_intact_chain(tmp_path: Path) -> None:
    """Threads leave their lines to whichever thread is writing: none lost, none twice,
    the file in chain order."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(400):
            log.record("secret.get", caller=f"spiffe://spike.internal/w{n}",
                       target=f"apps/{n}/{i}", outcome="ok", durable=(i % 100 == 99))

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    log.close()
    lines = path.read_text().splitlines()
    assert verify_lines(lines).ok
    targets = [json.loads(line)["target"] for line in lines]
    assert sorted(targets) == sorted(f"apps/{n}/{i}" for n in range(8) for i in range(400))


class FlakyWrite:
    """os.write as a filling disk behaves: a short write of 10 bytes, then one ENOSPC."""

    def __init__(self) -> None:
        self.real = os.write
        self.calls = 0

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.calls == 1:
            return self.real(fd, bytes(data[:10]))
        if self.calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


def test_a_failed_write_raises_and_the_line_is_written_whole_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.record("secret.put", caller="spiffe://spike.internal/a", target="one", outcome="ok")
    flaky = FlakyWrite()
    monkeypatch.setattr("nexus.audit.os.write", flaky)
    with pytest.raises(OSError, match="No space"):
        log.record("secret.put", caller="spiffe://spike.internal/a", target="two",
                   outcome="ok")
    log.record("secret.put", caller="spiffe://spike.internal/a", target="three",
               outcome="ok")
    log.close()
    lines = path.read_text().splitlines()
    assert verify_lines(lines).ok  # the torn tail was completed, not written twice
    assert [json.loads(line)["target"] for line in lines] == ["one", "two", "three"]


def test_a_durable_event_retries_a_failed_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    monkeypatch.setattr("nexus.audit.os.write", FlakyWrite())
    with pytest.raises(OSError):
        log.record("root_key.init", caller="c", outcome="ok", durable=True)
    log.record("root_key.recover", caller="c", outcome="ok", durable=True)
    lines = path.read_text().splitlines()  # before close: durable means already written
    assert [json.loads(line)["action"] for line in lines] == ["root_key.init",
                                                              "root_key.recover"]
    assert verify_lines(lines).ok
    log.close()


@settings(max_examples=400, deadline=None)
@given(action=st.text(), caller=st.text(), target=st.text(), outcome=st.text(),
       ts=st.floats(allow_nan=False, allow_infinity=False))
def test_the_fast_line_is_exactly_the_canonical_one(action: str, caller: str, target: str,
                                                    outcome: str, ts: float) -> None:
    """Routine events skip json.dumps; the bytes hashed must still be canonical()'s."""
    event = {"ts": ts, "action": action, "caller": caller, "target": target,
             "outcome": outcome}
    prev = "ab" * 32
    fast = audit_chain._simple_body(prev, event)
    try:
        expected = audit_chain.canonical(dict(event, prev=prev))
    except UnicodeEncodeError:  # lone surrogates: neither path can write them
        with pytest.raises(UnicodeEncodeError):
            audit_chain._simple_body(prev, event)
        return
    assert fast == expected
    line, digest = audit_chain.sealed_line(prev, event)
    assert audit_chain.chain_hash(prev, json.loads(line)) == digest


def test_other_event_shapes_take_the_general_path() -> None:
    base = {"ts": 1.5, "action": "a", "caller": "c", "target": "t", "outcome": "ok"}
    assert audit_chain._simple_body("p", {**base, "detail": {"x": 1}}) is None
    assert audit_chain._simple_body("p", {**base, "ts": 2}) is None  # an int, not a float
    assert audit_chain._simple_body("p", {**base, "ts": float("nan")}) is None
    assert audit_chain._simple_body("p", {**base, "caller": None}) is None
    line, digest = audit_chain.sealed_line("p", {**base, "detail": {"x": [1, "é"]}})
    assert audit_chain.chain_hash("p", json.loads(line)) == digest


# ------------------------------------------------------------------ bounded identities


def _unescape(text: str) -> str:
    """The inverse of the trail's escaping (backslash, \\n \\r \\t, \\xNN, \\uNNNN, \\UNNNNNNNN)."""
    out: list[str] = []
    i = 0
    short = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = text[i + 1]
        if kind in short:
            out.append(short[kind])
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}[kind]
        out.append(chr(int(text[i + 2:i + 2 + width], 16)))
        i += 2 + width
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=3000)
       | st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=1200)
       | st.text(alphabet=st.characters(categories=["Cc", "Cf", "Cs", "Zl", "Zp", "Co"])
                 | st.sampled_from("\\x"), max_size=800))
def test_bounded_identity_is_short_printable_and_faithful(text: str) -> None:
    """Never over 2048 bytes, never a non-printable character, and either the whole value
    (the escaping is reversible) or a faithful prefix with a marker naming its length."""
    from nexus.audit import MAX_ID_BYTES, bounded_identity

    out = bounded_identity(text)
    assert len(out.encode("utf-8")) <= MAX_ID_BYTES
    assert out.isprintable()
    if _unescape_safe(out) != text:
        marker = f"...({len(text.encode('utf-8', 'surrogatepass'))} bytes)"
        assert out.endswith(marker)
        assert text.startswith(_unescape(out[: -len(marker)]))
    if text.isprintable() and "\\" not in text and len(text.encode()) <= MAX_ID_BYTES:
        assert out == text  # a well-formed ID is kept as it is


def _unescape_safe(text: str) -> str | None:
    try:
        return _unescape(text)
    except (KeyError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ torn tails


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), cut=st.integers(1, 10_000), extra=st.binary(max_size=40))
def test_a_trail_cut_anywhere_in_its_last_line_restarts_intact(
        tmp_path_factory: pytest.TempPathFactory, n: int, cut: int, extra: bytes) -> None:
    """Whatever bytes a torn write left (any cut of a real line, or noise without a line
    break), start-up keeps them in .torn and the chain verifies again."""
    from spike.audit_chain import verify_file

    path = tmp_path_factory.mktemp("torn") / "audit.jsonl"
    log = AuditLog(str(path))
    for i in range(n):
        log.record("secret.get", caller="spiffe://spike.internal/é", target=f"a/{i}",
                   outcome="ok")
    log.close()
    data = path.read_bytes()
    last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
    keep = last_start + cut % (len(data) - 1 - last_start)  # cut inside the last line
    torn = data[last_start:keep] + extra.replace(b"\n", b"")
    path.write_bytes(data[:last_start] + torn)
    if torn:
        with path.open("rb") as fh:
            report = verify_file(fh)
        assert (report.ok, report.torn_bytes, report.lines) == (False, len(torn), n - 1)
    AuditLog(str(path)).close()
    moved = path.with_name(path.name + ".torn")
    assert (moved.read_bytes() if moved.exists() else b"") == torn
    with path.open("rb") as fh:
        assert verify_file(fh).ok


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80) | st.sampled_from(
    [b"\n", b'{"hash":"x","prev":"y"}\n', b"\xff\n", b"1" * 5000 + b"\n", b"[" * 5000]),
    max_size=8))
def test_verify_file_never_raises(pieces: list[bytes]) -> None:
    import io

    from spike.audit_chain import verify_file

    report = verify_file(io.BytesIO(b"".join(pieces)))
    assert report.ok or report.error

"""Every damaged backup is a clean "invalid backup"; the verifier survives; status tells the truth.

Issue 11, item 13: a backup file with a 4,300-digit JSON integer raised an uncaught ValueError
(INTERNAL on recover), killed the backup-verify thread, and status kept saying "backup ok" even
after the file was deleted. The parser is fuzzed here with hypothesis, on raw bytes and on
structured JSON mutations of a real backup (with the checksum recomputed, so that the mutation
reaches the deeper checks): only the documented :class:`BackupCorrupt` may come out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus.app import build_keys
from nexus.backup.format import Backup, BackupCorrupt, create_backup
from nexus.core import errors
from nexus.crypto.kdf import KdfParams
from nexus.crypto.secret_buffer import SecretKey
from nexus.store import open_store
from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    eventually,
    nexus_config,
    pilot,
    pilot_json,
)

PASSWORD = b"a long and boring test password"
HUGE = "9" * 4300  # int_max_str_digits is 4300: one digit more than that is refused by int()


def _valid() -> bytes:
    keys = {1: SecretKey.generate(), 2: SecretKey.generate()}
    backup, _ = create_backup(bytearray(PASSWORD), keys, KdfParams.insecure_for_tests())
    return backup.to_bytes()


VALID = _valid()


def parse(data: bytes) -> Backup:
    return Backup.parse(data, allow_insecure_kdf_for_tests=True)


def with_checksum(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    doc["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(doc).encode()


def only_corrupt(data: bytes) -> None:
    """Parsing ``data`` either succeeds or raises BackupCorrupt; nothing else."""
    with contextlib.suppress(BackupCorrupt):
        parse(data)


# ---------------------------------------------------------------- the reported case


@pytest.mark.parametrize("field", ["version", "time_cost", "generation", "top", "checksum"])
def test_a_4300_digit_integer_is_a_corrupt_backup(field: str) -> None:
    text = VALID.decode()
    if field == "version":
        text = text.replace('"version": 1', f'"version": 1{HUGE}', 1)
    elif field == "time_cost":
        text = text.replace('"time_cost": 1', f'"time_cost": 1{HUGE}', 1)
    elif field == "generation":
        text = text.replace('"generation": 1', f'"generation": 1{HUGE}', 1)
    elif field == "top":
        text = f"1{HUGE}"
    else:
        text = text.replace('"checksum": ', f'"checksum": 1{HUGE}, "x": ', 1)
    assert HUGE in text
    with pytest.raises(BackupCorrupt):
        parse(text.encode())


def test_recover_with_a_4300_digit_integer_is_invalid_backup(tmp_path: Path) -> None:
    store = open_store("sqlite", path=tmp_path / "spike.db")
    keys = build_keys(nexus_config(tmp_path, recover_backoff_seconds=30.0), store)
    keys.init(PASSWORD + b" orbit")
    keys.seal()
    bad = (tmp_path / "root-key.backup").read_text().replace('"version": 1',
                                                             f'"version": 1{HUGE}', 1)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD + b" orbit", bad.encode())
    (tmp_path / "root-key.backup").write_text(bad)
    with pytest.raises(errors.BackupInvalid):
        keys.recover(PASSWORD + b" orbit")
    assert keys.verify_backup_file().status == "corrupt"
    assert keys.recover_failures == 0
    store.close()


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_raw_bytes(data: bytes) -> None:
    only_corrupt(data)


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID)), st.binary(min_size=1, max_size=64),
       st.integers(min_value=0, max_value=64))
def test_fuzz_byte_edits_of_a_real_backup(at: int, insert: bytes, cut: int) -> None:
    only_corrupt(VALID[:at] + insert + VALID[at + cut:])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(json.loads(VALID)) if p and p[0] != "checksum"]


def _mutate(doc: Any, path: tuple[Any, ...], action: str, value: Any) -> None:
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[f"extra-{value!r}"[:20]] = value
    elif action == "add" and isinstance(parent, list):
        parent.append(value)
    elif action == "huge":
        parent[last] = 10**40 if isinstance(parent[last], int) else value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS),
                          st.sampled_from(["replace", "delete", "add", "huge"]), JSON),
                min_size=1, max_size=3),
       st.booleans())
def test_fuzz_structured_json_mutations(edits: list[tuple[tuple[Any, ...], str, Any]],
                                        fix_checksum: bool) -> None:
    doc = json.loads(VALID)
    for path, action, value in edits:
        try:
            _mutate(doc, path, action, value)
        except (KeyError, IndexError, TypeError):
            continue  # the path went away with an earlier edit
    data = with_checksum(doc) if fix_checksum else json.dumps(doc).encode()
    only_corrupt(data)


@FUZZ
@given(st.sampled_from(PATHS), st.sampled_from([f"1{HUGE}", f"-{HUGE}", "1e999", "-1e999",
                                               "NaN", "Infinity", '"\\ud800"', "[[[[[[[]]]]]]]",
                                               "[" * 5000 + "]" * 5000]))
def test_fuzz_hostile_json_literals(path: tuple[Any, ...], literal: str) -> None:
    doc = json.loads(VALID)
    marker = "@@MARK@@"
    _mutate(doc, path, "replace", marker)
    data = with_checksum(doc).replace(f'"{marker}"'.encode(), literal.encode())
    only_corrupt(data)


# ---------------------------------------------------------------- a real Nexus


def audit_checks(data_dir: Path) -> list[str]:
    path = data_dir / "audit.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["outcome"] for e in events if e.get("action") == "backup.check"]


def test_the_verifier_survives_a_poisoned_file_and_status_tells_the_truth(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = tmp / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    nexus = Nexus(data_dir, agent.env("nexus"),
                  args=["--backup-verify-interval-seconds", "0.2"])
    su = agent.env("pilot")
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        path = data_dir / "root-key.backup"
        good = path.read_bytes()
        path.write_text(good.decode().replace('"version": 1', f'"version": 1{HUGE}', 1))
        # The verifier (not status: nothing asks for it here) finds the poisoned file...
        eventually(lambda: "corrupt" in audit_checks(data_dir), "the verifier to see corruption")
        # ...and keeps running: it sees the repaired file too.
        path.write_bytes(good)
        eventually(lambda: audit_checks(data_dir)[-1:] == ["ok"], "the verifier to see the fix")
        assert not [e for e in nexus.log_events() if e.get("level") == "error"]
        # Deleted: status says so at once, whatever the verifier's interval.
        path.unlink()
        state = pilot_json(["status", "--output", "json"], su, nexus)
        assert state["backup"]["status"] == "missing", state["backup"]
        path.write_text("{")
        state = pilot_json(["status", "--output", "json"], su, nexus)
        assert state["backup"]["status"] == "corrupt", state["backup"]
        result = pilot(["backup", "status"], su, nexus)
        assert result.returncode == 1 and "corrupt" in result.stdout, result
    finally:
        nexus.stop()


def test_status_reports_a_deleted_file_even_with_a_slow_verifier(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = tmp / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    nexus = Nexus(data_dir, agent.env("nexus"))  # the default interval: one check an hour
    su = agent.env("pilot")
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        assert pilot_json(["status", "--output", "json"], su, nexus)["backup"]["status"] == "ok"
        (data_dir / "root-key.backup").unlink()
        state = pilot_json(["status", "--output", "json"], su, nexus)
        assert state["backup"]["status"] == "missing", state["backup"]
    finally:
        nexus.stop()

"""Leak checks: the root key and the passwords never reach a file, a log line or Pilot's output.

Nexus never reveals the root key, so the tests obtain it the legitimate way: by opening an
exported backup with the password, in-process.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from nexus.app import build_keys
from nexus.backup.format import Backup, open_backup
from nexus.core import errors
from nexus.core.keymanager import KeyManager
from nexus.store import Store, open_store
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, nexus_config, pilot

NEW_PASSWORD = "violet anchor drizzle quantum ferry"  # noqa: S105 - a test fixture
WRONG_PASSWORD = "tangerine glacier ladder ninety"  # noqa: S105 - a test fixture


def text_forms(secret: bytes) -> list[str]:
    """The ways a secret could show up in text: hex (both cases), base64 std/urlsafe."""
    forms = [secret.hex(), secret.hex().upper()]
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        full = enc(secret).decode()
        forms += [full, full.rstrip("=")]
    return sorted(set(forms))


def byte_forms(secret: bytes) -> list[bytes]:
    return [secret, *(f.encode() for f in text_forms(secret))]


def password_forms(password: str) -> list[bytes]:
    raw = password.encode("utf-8")
    return byte_forms(raw)


def find(haystacks: Iterable[tuple[str, bytes]], needles: list[bytes]) -> list[str]:
    hits = []
    for where, data in haystacks:
        for needle in needles:
            if needle in data:
                hits.append(f"{where}: {needle[:12]!r}...")
    return hits


def files_under(directory: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()]


def root_key_from(exported: Path, password: str) -> bytes:
    backup = Backup.parse(exported.read_bytes(), allow_insecure_kdf_for_tests=True)
    keys, record_key = open_backup(backup, bytearray(password.encode()))
    record_key.wipe()
    try:
        assert list(keys) == [1]
        with keys[1].view() as view:
            return bytes(view)
    finally:
        for key in keys.values():
            key.wipe()


# ---------------------------------------------------------------- real processes


def assert_no_leaks(data_dir: Path, nexuses: Sequence[Nexus],
                    runs: Sequence[tuple[str, subprocess.CompletedProcess[str]]],
                    root_key: bytes) -> None:
    """Neither the root key nor a password, in any form, in the data files, Nexus's logs,
    Pilot's output or the audit trail."""
    log_lines = [line for running in nexuses for line in running.lines]
    assert any('"unsealed"' in line for line in log_lines)  # the logs were captured
    logs = [(f"nexus log line {i}", line.encode()) for i, line in enumerate(log_lines)]
    pilot_out = [(f"spike {name} {stream}", text.encode())
                 for name, result in runs
                 for stream, text in (("stdout", result.stdout), ("stderr", result.stderr))]
    data_files = files_under(data_dir)
    names = {Path(name).name for name, _ in data_files}
    assert {"root-key.backup", "root-key.backup.prev", "audit.jsonl", "spike.db"} <= names
    audit = (data_dir / "audit.jsonl").read_bytes()
    assert b'"wrong_password"' in audit

    # The detector itself works: each form of the key is found when planted.
    for form in byte_forms(root_key):
        assert find([("planted", b"x" + form + b"y")], byte_forms(root_key))
    key_hits = find([*data_files, *logs, *pilot_out], byte_forms(root_key))
    assert not key_hits, key_hits
    for password in (TEST_PASSWORD, NEW_PASSWORD, WRONG_PASSWORD):
        hits = find([*data_files, *logs, *pilot_out, ("audit", audit)],
                    password_forms(password))
        assert not hits, hits


def test_full_scenario_leaks_neither_root_key_nor_password(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw_file = tmp / "pw"
    pw_file.write_text(TEST_PASSWORD + "\n")
    new_file = tmp / "new"
    new_file.write_text(NEW_PASSWORD + "\n")
    pw_file.chmod(0o600)
    new_file.chmod(0o600)
    env = agent.env("pilot")
    runs: list[tuple[str, subprocess.CompletedProcess[str]]] = []
    nexuses: list[Nexus] = []

    def start() -> Nexus:
        running = Nexus(data_dir, agent.env("nexus"),
                        args=["--recover-backoff-seconds", "0.01", "--log-level", "debug"])
        nexuses.append(running)
        return running

    def spike(nexus: Nexus, *args: str, stdin: str | None = None, code: int = 0) -> None:
        result = pilot(list(args), env, nexus, stdin=stdin)
        runs.append((" ".join(args), result))
        assert result.returncode == code, (args, result)

    nexus = start()
    try:
        spike(nexus, "init", "--password-stdin", stdin=TEST_PASSWORD + "\n")
        spike(nexus, "status")
        first_export = tmp / "first.backup"
        spike(nexus, "backup", "export", "--out", str(first_export))
        nexus.kill()
        nexus = start()
        spike(nexus, "recover", "--password-stdin", stdin=WRONG_PASSWORD + "\n", code=8)
        spike(nexus, "recover", "--password-file", str(pw_file), "--output", "json")
        spike(nexus, "backup", "verify", "--password-file", str(pw_file))
        spike(nexus, "backup", "verify", "--password-stdin", stdin=WRONG_PASSWORD + "\n",
              code=8)
        spike(nexus, "backup", "status")
        spike(nexus, "password", "change", "--password-stdin",
              stdin=f"{TEST_PASSWORD}\n{NEW_PASSWORD}\n")
        second_export = tmp / "second.backup"
        spike(nexus, "backup", "export", "--out", str(second_export), "--output", "json")
        nexus.kill()
        nexus = start()
        spike(nexus, "recover", "--password-file", str(new_file))
        spike(nexus, "status", "--output", "json")
    finally:
        for running in nexuses:
            running.stop()

    root_key = root_key_from(first_export, TEST_PASSWORD)
    assert root_key_from(second_export, NEW_PASSWORD) == root_key
    assert len(root_key) == 32

    assert_no_leaks(data_dir, nexuses, runs, root_key)


# ---------------------------------------------------------------- in-process, captured logs


def event_texts(events: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    out = []
    for i, event in enumerate(events):
        rendered = json.dumps(event, default=repr, sort_keys=True)
        out.append((f"event {i} {event.get('event')}", rendered.encode()))
        for key, value in event.items():
            out.append((f"event {i} {key}", f"{value!s}{value!r}".encode()))
    return out


def test_key_manager_logs_no_password_or_key(tmp: Path) -> None:
    password = TEST_PASSWORD.encode()
    new = NEW_PASSWORD.encode()

    stores: list[Store] = []

    def manager() -> KeyManager:
        # One store per SQLite file: the previous "process" closes its store first.
        while stores:
            stores.pop().close()
        stores.append(open_store("sqlite", path=tmp / "spike.db"))
        return build_keys(nexus_config(tmp), stores[-1])

    raised: list[str] = []
    with capture_logs() as events:
        first = manager()
        first.init(password)
        with first.keyring.key_for(1).view() as view:
            root_key = bytes(view)
        texts = [repr(first.keyring), repr(first.keyring.key_for(1)),
                 repr(first.keyring.entry(1)), str(first.keyring.entry(1))]
        first.seal()

        second = manager()
        with pytest.raises(errors.WrongPassword) as wrong:
            second.recover(WRONG_PASSWORD.encode())
        raised += [str(wrong.value), repr(wrong.value)]
        with pytest.raises(errors.BackupInvalid) as corrupt:
            second.recover(password, b'{"format": "spike-nexus-backup", "version": 1}')
        raised += [str(corrupt.value), repr(corrupt.value)]
        second.recover(password)
        with pytest.raises(errors.WrongPassword) as wrong:
            second.verify_with_password(WRONG_PASSWORD.encode())
        raised += [str(wrong.value)]
        second.verify_with_password(password)
        with pytest.raises(errors.PasswordRejected) as weak:
            second.change_password(password, b"too short")
        raised += [str(weak.value)]
        second.change_password(password, new)
        second.verify_backup_file()
        texts += [repr(second.keyring), repr(second._backup.current)]
        second.seal()
        stores.pop().close()

    names = [e.get("event") for e in events]
    assert "root key generated" in names and "unsealed" in names and "wrong password" in names
    haystacks = [*event_texts(events), *(("text", t.encode()) for t in texts + raised)]
    assert not find(haystacks, byte_forms(root_key))
    for pw in (TEST_PASSWORD, NEW_PASSWORD, WRONG_PASSWORD, "too short"):
        assert not find(haystacks, password_forms(pw)), pw
    # Nothing secret in the data directory either.
    assert not find(files_under(tmp), byte_forms(root_key))
    assert not find(files_under(tmp), password_forms(TEST_PASSWORD) + password_forms(NEW_PASSWORD))


def test_secret_values_stay_out_of_reprs() -> None:
    """A repr ends up in tracebacks and logs: the objects that carry secret values show their
    shape, never a value."""
    from nexus.core.secrets import ImportEntry, SecretVersion

    value = "s3cr3t-value-in-a-repr"
    entry = ImportEntry(7, "apps/db", {"password": value})
    version = SecretVersion("apps/db", 2, {"password": value}, 1.0)
    for shown in (repr(entry), str(entry), repr(version), str(version), repr([entry])):
        assert value not in shown
        assert "apps/db" in shown
    assert "line=7" in repr(entry) and "1 keys" in repr(entry)

"""Root key lifecycle with real processes: init, kill -9, restart, recover, bad input, backoff.

Every test starts its own Nexus (cheap Argon2id through the harness's test flag) and talks to it
only through Pilot (``python -m pilot``) or, for the health check, a real mTLS gRPC channel.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus.core.ledger import BACKUP_COPY_STATE
from spike.identity import fetch_svid
from spike.tls import client_channel
from tests.harness import (
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    audit_events,
    pilot,
    pilot_json,
    short_tmpdir,
    writer,
)

NEW_PASSWORD = "violet anchor drizzle quantum ferry"  # noqa: S105 - a test fixture
OTHER_PASSWORD = "marble lantern seventy crisp oboe"  # noqa: S105 - a test fixture
WRONG = "P_WRONG"  # marker: the password file holding a wrong (but well-formed) password
BACKUP = "root-key.backup"
WRONG_PASSWORD_MSG = "password does not open"  # noqa: S105 - a message


# ---------------------------------------------------------------- helpers


def password_file(directory: Path, password: str, name: str = "") -> Path:
    path = directory / (name or f"pw-{hashlib.sha256(password.encode()).hexdigest()[:8]}")
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def start(agent: DevAgent, data_dir: Path, backoff: float = 0.05) -> Nexus:
    return Nexus(data_dir, agent.env("nexus"), args=["--recover-backoff-seconds", str(backoff)])


def restart(agent: DevAgent, running: Nexus, backoff: float = 0.05) -> Nexus:
    """kill -9 the running Nexus and start a new one on the same data directory."""
    running.kill()
    return start(agent, running.data_dir, backoff)


def status(agent: DevAgent, nexus: Nexus) -> dict[str, Any]:
    return pilot_json(["status", "--output", "json"], agent.env("pilot"), nexus)


def init(agent: DevAgent, nexus: Nexus, pw: Path) -> dict[str, Any]:
    return pilot_json(["init", "--password-file", str(pw), "--output", "json"],
                      agent.env("pilot"), nexus)


def recover(
    agent: DevAgent, nexus: Nexus, pw: Path, backup_file: Path | None = None,
    identity: str = "pilot", patient: bool = True, extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`spike recover`; with ``patient`` it waits out a backoff left by an earlier failure."""
    args = ["recover", "--password-file", str(pw), "--output", "json", *extra]
    if backup_file is not None:
        args += ["--backup-file", str(backup_file)]
    deadline = time.monotonic() + 30
    while True:
        result = pilot(args, agent.env(identity), nexus)
        if not (patient and result.returncode == 9 and "retry in" in result.stderr):
            return result
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.05)


def health(agent: DevAgent, nexus: Nexus) -> int:
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    try:
        return health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[no-any-return]
            health_pb2.HealthCheckRequest(), timeout=5).status
    finally:
        channel.close()


def snapshot(data_dir: Path) -> dict[str, bytes | None]:
    """The backup file and its previous copy, byte for byte (None when absent)."""
    out: dict[str, bytes | None] = {}
    for name in (BACKUP, BACKUP + ".prev"):
        path = data_dir / name
        out[name] = path.read_bytes() if path.exists() else None
    return out


def checksum(doc: dict[str, Any]) -> str:
    """The backup checksum as documented in nexus/backup/format.py."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def flip_b64(value: str, index: int) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def flip_hex(value: str) -> str:
    return f"{int(value[0], 16) ^ 1:x}" + value[1:]


# ---------------------------------------------------------------- restart and recover


def test_init_kill9_restart_sealed_then_recover_same_fingerprint(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = password_file(tmp, TEST_PASSWORD)
    nexus = start(agent, data_dir)
    try:
        assert status(agent, nexus)["state"] == "uninitialized"
        assert health(agent, nexus) == health_pb2.HealthCheckResponse.NOT_SERVING
        created = init(agent, nexus, pw)
        assert created["root_key_generation"] == 1
        fp = created["root_key_fingerprint"]
        before = status(agent, nexus)
        assert before["state"] == "unsealed"
        assert before["root_key_fingerprint"] == fp
        assert before["backup"]["status"] == "ok"
        assert before["hardening"]["core_dumps_disabled"]
        assert before["hardening"]["dumpable_off"]
        assert health(agent, nexus) == health_pb2.HealthCheckResponse.SERVING
        backup_path = data_dir / BACKUP
        assert backup_path.stat().st_mode & 0o777 == 0o600

        nexus = restart(agent, nexus)
        sealed = status(agent, nexus)
        assert sealed["state"] == "sealed"
        assert sealed["root_key_fingerprint"] == ""
        assert health(agent, nexus) == health_pb2.HealthCheckResponse.NOT_SERVING

        # The gate: export needs the key in memory; exit 5 and tell the operator what to run.
        out = tmp / "export.json"
        refused = pilot(["backup", "export", "--out", str(out)], agent.env("pilot"), nexus)
        assert refused.returncode == 5, refused
        assert "spike recover" in refused.stderr
        assert not out.exists()

        result = recover(agent, nexus, pw)
        assert result.returncode == 0, result
        recovered = json.loads(result.stdout.splitlines()[-1])
        assert recovered["root_key_fingerprint"] == fp
        assert recovered["generations"] == [1]
        after = status(agent, nexus)
        assert after["state"] == "unsealed"
        assert after["root_key_fingerprint"] == fp
        assert after["backup"]["status"] == "ok"
        assert health(agent, nexus) == health_pb2.HealthCheckResponse.SERVING
        verified = pilot_json(["backup", "verify", "--password-file", str(pw), "--output",
                               "json"], agent.env("pilot"), nexus)
        assert verified["ok"] is True and verified["generations"] == [1]
        # Recovering twice is refused, not silently repeated.
        again = recover(agent, nexus, pw)
        assert again.returncode != 0
    finally:
        nexus.stop()


def test_server_backup_lost_recover_from_exported_copy(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = password_file(tmp, TEST_PASSWORD)
    nexus = start(agent, data_dir)
    try:
        fp = init(agent, nexus, pw)["root_key_fingerprint"]
        exported = tmp / "offsite.backup"
        done = pilot_json(["backup", "export", "--out", str(exported), "--output", "json"],
                          agent.env("pilot"), nexus)
        assert done["generations"] == [1]
        assert exported.read_bytes() == (data_dir / BACKUP).read_bytes()
        assert exported.stat().st_mode & 0o777 == 0o600
        # An existing file is not overwritten without --force.
        clash = pilot(["backup", "export", "--out", str(exported)], agent.env("pilot"), nexus)
        assert clash.returncode == 2

        nexus.kill()
        (data_dir / BACKUP).unlink()
        nexus = start(agent, data_dir)
        assert status(agent, nexus)["state"] == "sealed"  # the store remembers the key exists
        # The store keeps a copy of the sealed backup: the password alone recovers, and the
        # file is written back from it.
        from_copy = recover(agent, nexus, pw)
        assert from_copy.returncode == 0, from_copy
        assert (data_dir / BACKUP).read_bytes() == exported.read_bytes()
        assert [e["outcome"] for e in audit_events(data_dir)
                if e["action"] == "recover.store_copy"] == ["restored"]

        nexus.kill()
        (data_dir / BACKUP).unlink()
        with contextlib.closing(writer(data_dir)) as db:  # a store that keeps no copy
            db.execute("DELETE FROM state WHERE key = ?", (BACKUP_COPY_STATE,))
        nexus = start(agent, data_dir)
        assert status(agent, nexus)["state"] == "sealed"

        # Without the file or the store's copy the server cannot recover, and says how to
        # proceed.
        missing = recover(agent, nexus, pw)
        assert missing.returncode == 8, missing
        assert "--backup-file" in missing.stderr

        result = recover(agent, nexus, pw, backup_file=exported)
        assert result.returncode == 0, result
        assert json.loads(result.stdout.splitlines()[-1])["root_key_fingerprint"] == fp
        assert status(agent, nexus)["root_key_fingerprint"] == fp
        # The server's file is restored from the copy that opened.
        assert (data_dir / BACKUP).read_bytes() == exported.read_bytes()
        assert (data_dir / BACKUP).stat().st_mode & 0o777 == 0o600
        assert pilot_json(["backup", "status", "--output", "json"], agent.env("pilot"),
                          nexus)["status"] == "ok"
        recovers = [e for e in audit_events(data_dir) if e["action"] == "recover"]
        assert recovers[-1]["outcome"] == "ok"
        assert recovers[-1]["target"] == "exported copy"

        # And the restored file alone is enough after the next restart.
        nexus = restart(agent, nexus)
        again = recover(agent, nexus, pw)
        assert again.returncode == 0, again
        assert json.loads(again.stdout.splitlines()[-1])["root_key_fingerprint"] == fp
    finally:
        nexus.stop()


# ---------------------------------------------------------------- bad input


def _field_mutations() -> list[tuple[str, Callable[[dict[str, Any]], None], str]]:
    """(name, mutate-in-place, expected class when the checksum is recomputed).

    Classes: "password" = the password no longer derives the stored public key, which is all the
    server can say (a changed salt or KDF cost is indistinguishable from a wrong password);
    "invalid" = corrupt/unsupported/mismatched backup; "either" = depends on the bytes.
    """

    def gen(doc: dict[str, Any]) -> dict[str, Any]:
        return doc["generations"][0]  # type: ignore[no-any-return]

    def set_(path: tuple[str, ...], fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
        def mutate(doc: dict[str, Any]) -> None:
            obj = doc
            for key in path[:-1]:
                obj = obj[key]
            obj[path[-1]] = fn(obj[path[-1]])
        return mutate

    def set_gen(key: str, fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
        def mutate(doc: dict[str, Any]) -> None:
            gen(doc)[key] = fn(gen(doc)[key])
        return mutate

    return [
        ("format", set_(("format",), lambda v: "x" + v[1:]), "invalid"),
        ("version+1", set_(("version",), lambda v: v + 1), "invalid"),
        ("version-string", set_(("version",), str), "invalid"),
        ("kdf.algorithm", set_(("kdf", "algorithm"), lambda v: v[:-1]), "invalid"),
        ("kdf.argon2_version", set_(("kdf", "argon2_version"), lambda v: v ^ 1), "invalid"),
        ("kdf.time_cost", set_(("kdf", "time_cost"), lambda v: v + 1), "password"),
        ("kdf.memory_kib", set_(("kdf", "memory_kib"), lambda v: v ^ 1), "password"),
        ("kdf.parallelism", set_(("kdf", "parallelism"), lambda v: v + 1), "password"),
        ("kdf.out_len", set_(("kdf", "out_len"), lambda v: v ^ 1), "invalid"),
        ("salt", set_(("salt",), lambda v: flip_b64(v, 0)), "password"),
        ("hpke.kem", set_(("hpke", "kem"), lambda v: v.lower()), "invalid"),
        ("hpke.aead", set_(("hpke", "aead"), lambda v: v.replace("256", "128")), "invalid"),
        ("public_key.x25519", set_(("public_key",), lambda v: flip_b64(v, -1)), "password"),
        ("public_key.mlkem", set_(("public_key",), lambda v: flip_b64(v, 7)), "either"),
        ("generation", set_gen("generation", lambda v: v + 1), "invalid"),
        ("fingerprint", set_gen("fingerprint", flip_hex), "invalid"),
        ("sealed.enc", set_gen("sealed", lambda v: flip_b64(v, 0)), "invalid"),
        ("sealed.ciphertext", set_gen("sealed", lambda v: flip_b64(v, -20)), "invalid"),
        ("sealed.tag", set_gen("sealed", lambda v: flip_b64(v, -1)), "invalid"),
    ]


class Refusals:
    """Recovers that must be refused, leaving the backup files as ``before`` holds them."""

    def __init__(self, agent: DevAgent, nexus: Nexus, data_dir: Path) -> None:
        self.agent, self.nexus, self.data_dir = agent, nexus, data_dir
        self.before = snapshot(data_dir)

    def refused(self, password: Path, backup_file: Path | None, code: int, label: str) -> str:
        result = recover(self.agent, self.nexus, password, backup_file)
        assert result.returncode == code, (label, result.returncode, result.stderr)
        assert snapshot(self.data_dir) == self.before, f"{label}: the backup files changed"
        return result.stderr


def refuse_broken_files(r: Refusals, pw: Path, tmp: Path, raw: bytes) -> None:
    """Truncated, empty, garbage and missing files."""
    for label, data in [("half", raw[: len(raw) // 2]), ("100 bytes", raw[:100]),
                        ("minus 10", raw[:-10]), ("not json", b"\x00\xff" * 64)]:
        bad = tmp / "bad.backup"
        bad.write_bytes(data)
        err = r.refused(pw, bad, 8, f"truncated: {label}")
        assert "corrupt" in err and WRONG_PASSWORD_MSG not in err, (label, err)
    (tmp / "empty.backup").write_bytes(b"")
    assert "empty" in r.refused(pw, tmp / "empty.backup", 2, "empty file")
    r.refused(pw, tmp / "nope.backup", 2, "missing file")


def refuse_altered_fields(r: Refusals, pw: Path, tmp: Path, doc: dict[str, Any]) -> None:
    """One field altered at a time, with the checksum stale and recomputed; then the checksum
    field itself."""
    for name, mutate, expected in _field_mutations():
        altered = copy.deepcopy(doc)
        mutate(altered)
        assert altered != doc, name
        for recompute in (False, True):
            if recompute:
                altered["checksum"] = checksum(altered)
            bad = tmp / "bad.backup"
            bad.write_text(json.dumps(altered, indent=2))
            label = f"{name} ({'recomputed' if recompute else 'stale'} checksum)"
            err = r.refused(pw, bad, 8, label)
            kind = "password" if WRONG_PASSWORD_MSG in err else "invalid"
            if name.startswith(("format", "version")):
                assert kind == "invalid", (label, err)  # checked before the checksum
            elif not recompute:
                assert "checksum" in err and kind == "invalid", (label, err)
            elif expected != "either":
                assert kind == expected, (label, err)
            if name == "version+1":
                assert "not supported" in err, err
    for value in (flip_hex(doc["checksum"][7:]), "md5:00"):
        altered = dict(doc, checksum="sha256:" + value if ":" not in value else value)
        bad = tmp / "bad.backup"
        bad.write_text(json.dumps(altered))
        assert "checksum" in r.refused(pw, bad, 8, f"checksum {value[:8]}")


def corrupt_server_file_then_prev(r: Refusals, pw: Path, old_pw: Path, fp: str) -> None:
    """A corrupt server file: clear error, left in place, and the .prev copy still works."""
    data_dir = r.data_dir
    broken = r.before[BACKUP]
    assert broken is not None
    (data_dir / BACKUP).write_bytes(broken[: len(broken) // 3])
    r.before = snapshot(data_dir)
    err = r.refused(pw, None, 8, "corrupt server file")
    assert "corrupt" in err and WRONG_PASSWORD_MSG not in err
    # .prev was written before the password change: it opens with the OLD password, and
    # recovering from it needs the operator's explicit consent (it would seal the
    # server's backup under the old password again).
    prev = data_dir / (BACKUP + ".prev")
    good_prev = prev.read_bytes()
    err = r.refused(old_pw, prev, 8, ".prev without consent")
    assert "earlier administrator password" in err and "--accept-old-password" in err
    result = recover(r.agent, r.nexus, old_pw, backup_file=prev,
                     extra=("--accept-old-password",))
    assert result.returncode == 0, result
    assert json.loads(result.stdout.splitlines()[-1])["root_key_fingerprint"] == fp
    assert (data_dir / BACKUP).read_bytes() == good_prev
    # The last good copy is not pushed out of .prev by the corrupt file, which is set aside.
    assert prev.read_bytes() == good_prev
    assert (data_dir / (BACKUP + ".corrupt")).read_bytes() == broken[: len(broken) // 3]


def test_bad_backups_and_passwords_are_refused_and_nothing_is_overwritten(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    old_pw = password_file(tmp, TEST_PASSWORD)
    pw = password_file(tmp, NEW_PASSWORD)
    wrong = password_file(tmp, "tangerine glacier ladder ninety", WRONG)
    nexus = start(agent, data_dir, backoff=0.01)
    try:
        fp = init(agent, nexus, old_pw)["root_key_fingerprint"]
        # A password change makes a .prev copy exist, so both files are watched below.
        changed = pilot(["password", "change", "--password-file", str(old_pw),
                         "--new-password-file", str(pw)], agent.env("pilot"), nexus)
        assert changed.returncode == 0, changed
        good = tmp / "good.backup"
        pilot_json(["backup", "export", "--out", str(good), "--output", "json"],
                   agent.env("pilot"), nexus)
        nexus = restart(agent, nexus, backoff=0.01)
        r = Refusals(agent, nexus, data_dir)
        assert r.before[BACKUP] is not None and r.before[BACKUP + ".prev"] is not None
        doc = json.loads(good.read_bytes())
        assert checksum(doc) == doc["checksum"]  # our reading of the format is right

        # Wrong password: its own message, distinct from every corrupt-backup message.
        assert WRONG_PASSWORD_MSG in r.refused(wrong, None, 8, "wrong password")
        assert WRONG_PASSWORD_MSG in r.refused(wrong, good, 8, "wrong password, exported copy")
        assert WRONG_PASSWORD_MSG in r.refused(old_pw, None, 8, "old password")

        refuse_broken_files(r, pw, tmp, good.read_bytes())
        refuse_altered_fields(r, pw, tmp, doc)
        assert status(agent, nexus)["state"] == "sealed"

        corrupt_server_file_then_prev(r, pw, old_pw, fp)
    finally:
        nexus.stop()


def test_unsafe_kdf_parameters_refused_by_a_production_nexus(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    """A backup with sub-OWASP Argon2id costs (as our tests make) is refused in production."""
    test_nexus = start(agent, data_dir)
    try:
        pw = password_file(tmp, TEST_PASSWORD)
        init(agent, test_nexus, pw)
        weak = tmp / "weak.backup"
        pilot_json(["backup", "export", "--out", str(weak), "--output", "json"],
                   agent.env("pilot"), test_nexus)
    finally:
        test_nexus.stop()
    prod_dir = short_tmpdir("nxp-")
    prod = Nexus(prod_dir, agent.env("nexus"), insecure_kdf=False)
    try:
        result = recover(agent, prod, pw, backup_file=weak)
        assert result.returncode == 8, result
        assert "KDF" in result.stderr and WRONG_PASSWORD_MSG not in result.stderr
        assert status(agent, prod)["state"] == "uninitialized"
        assert not (prod_dir / BACKUP).exists()
    finally:
        prod.stop()
        shutil.rmtree(prod_dir, ignore_errors=True)


def test_init_password_policy(agent: DevAgent, data_dir: Path, tmp: Path) -> None:
    nexus = start(agent, data_dir)
    try:
        cases = [
            ("empty", "", "empty"),
            ("short", "tiny horse", "at least 15"),
            ("blocklisted", "1qaz2wsx3edc4rfv", "common"),
            ("common padded", "password1234567890!", "common"),
            ("repetitive", "iloveyouiloveyou", ""),
            ("too long", "ab cd ef gh " * 100, "at most 1024"),
        ]
        for label, password, words in cases:
            result = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                           stdin=password + "\n")
            assert result.returncode == 2, (label, result)
            assert words in result.stderr, (label, result.stderr)
            if password:
                assert password not in result.stderr  # never echoed back
            assert status(agent, nexus)["state"] == "uninitialized", label
            assert snapshot(data_dir) == {BACKUP: None, BACKUP + ".prev": None}, label
        rejected = [e for e in audit_events(data_dir) if e["action"] == "init"]
        assert [e["outcome"] for e in rejected] == ["password_rejected"] * (len(cases) - 1)
        # NFKC: the full-width form of the password is the same password.
        wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in TEST_PASSWORD)
        ok = pilot(["init", "--password-stdin", "--output", "json"], agent.env("pilot"), nexus,
                   stdin=wide + "\n")
        assert ok.returncode == 0, ok
        nexus = restart(agent, nexus)
        assert recover(agent, nexus, password_file(tmp, TEST_PASSWORD)).returncode == 0
        # Initializing twice is refused.
        twice = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                      stdin=OTHER_PASSWORD + "\n")
        assert twice.returncode != 0 and "already initialized" in twice.stderr
    finally:
        nexus.stop()


def test_foreign_backup_is_refused(agent: DevAgent, tmp: Path) -> None:
    """A backup of another Nexus, even sealed with the same password, never unseals this one."""
    pw = password_file(tmp, TEST_PASSWORD)
    dirs = [short_tmpdir("nxa-"), short_tmpdir("nxb-")]
    other = start(agent, dirs[0])
    try:
        init(agent, other, pw)
        foreign = tmp / "foreign.backup"
        pilot_json(["backup", "export", "--out", str(foreign), "--output", "json"],
                   agent.env("pilot"), other)
    finally:
        other.stop()
    nexus = start(agent, dirs[1])
    try:
        init(agent, nexus, pw)
        nexus = restart(agent, nexus)
        before = snapshot(dirs[1])
        result = recover(agent, nexus, pw, backup_file=foreign)
        assert result.returncode == 8, result
        assert "another Nexus" in result.stderr
        assert snapshot(dirs[1]) == before
        assert status(agent, nexus)["state"] == "sealed"
        # The server file of the other Nexus copied over ours: refused the same way.
        shutil.copy(foreign, dirs[1] / BACKUP)
        before = snapshot(dirs[1])
        result = recover(agent, nexus, pw)
        assert result.returncode == 8 and "another Nexus" in result.stderr, result
        assert snapshot(dirs[1]) == before
        assert status(agent, nexus)["state"] == "sealed"
    finally:
        nexus.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- backoff and audit


def test_wrong_password_backs_off_and_is_audited(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    """The backoff is served in the wrong-password answer: each wrong answer comes only once
    its delay (doubling) has passed, so the right password straight after is accepted."""
    pw = password_file(tmp, TEST_PASSWORD)
    wrong = password_file(tmp, "tangerine glacier ladder ninety", WRONG)
    nexus = start(agent, data_dir, backoff=0.5)
    try:
        init(agent, nexus, pw)
        nexus = restart(agent, nexus, backoff=0.5)
        first = recover(agent, nexus, wrong, patient=False)
        assert first.returncode == 8 and WRONG_PASSWORD_MSG in first.stderr, first
        t1 = time.monotonic()
        second = recover(agent, nexus, wrong, patient=False)
        held = time.monotonic() - t1
        assert second.returncode == 8, second
        assert held >= 1.0, held  # the second delay is 1 s (a lower bound: load only adds)
        assert status(agent, nexus)["state"] == "sealed"
        ok = recover(agent, nexus, pw, patient=False)  # at once: no backoff left
        assert ok.returncode == 0, ok
        outcomes = [(e["outcome"], e["caller"]) for e in audit_events(data_dir)
                    if e["action"] == "recover"]
        superuser = "spiffe://spike.internal/spike/pilot/role/superuser"
        assert outcomes == [("wrong_password", superuser), ("wrong_password", superuser),
                            ("ok", superuser)]
        warnings = [e for e in nexus.log_events() if e.get("event") == "wrong password"]
        assert [w["failures"] for w in warnings] == [1, 2]
        assert [w["next_attempt_in"] for w in warnings] == [0.5, 1.0]
    finally:
        nexus.stop()


# ---------------------------------------------------------------- roles


def test_recover_role_recovers_but_cannot_init_or_export(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw = password_file(tmp, TEST_PASSWORD)
    out = tmp / "export.backup"
    nexus = start(agent, data_dir)
    try:
        denied = pilot(["init", "--password-file", str(pw)], agent.env("recover"), nexus)
        assert denied.returncode == 4, denied
        assert status(agent, nexus)["state"] == "uninitialized"
        fp = init(agent, nexus, pw)["root_key_fingerprint"]
        nexus = restart(agent, nexus)
        result = recover(agent, nexus, pw, identity="recover")
        assert result.returncode == 0, result
        assert json.loads(result.stdout.splitlines()[-1])["root_key_fingerprint"] == fp
        for args in (["backup", "export", "--out", str(out)],
                     ["init", "--password-file", str(pw)],
                     ["password", "change", "--password-file", str(pw),
                      "--new-password-file", str(pw)]):
            denied = pilot(args, agent.env("recover"), nexus)
            assert denied.returncode == 4, (args, denied)
        assert not out.exists()
        # A workload identity cannot recover at all.
        nexus = restart(agent, nexus)
        assert recover(agent, nexus, pw, identity="workload").returncode == 4
        assert status(agent, nexus)["state"] == "sealed"
    finally:
        nexus.stop()


# ---------------------------------------------------------------- password change


def test_password_change(agent: DevAgent, data_dir: Path, tmp: Path) -> None:
    old = password_file(tmp, TEST_PASSWORD)
    new = password_file(tmp, NEW_PASSWORD)
    wrong = password_file(tmp, "tangerine glacier ladder ninety", WRONG)
    nexus = start(agent, data_dir)
    try:
        fp = init(agent, nexus, old)["root_key_fingerprint"]
        before = snapshot(data_dir)

        bad_old = pilot(["password", "change", "--password-file", str(wrong),
                         "--new-password-file", str(new)], agent.env("pilot"), nexus)
        assert bad_old.returncode == 8 and WRONG_PASSWORD_MSG in bad_old.stderr, bad_old
        assert snapshot(data_dir) == before
        time.sleep(0.1)  # let the backoff from that failure pass
        weak_new = pilot(["password", "change", "--password-stdin"], agent.env("pilot"),
                         nexus, stdin=f"{TEST_PASSWORD}\nshort one\n")
        assert weak_new.returncode == 2 and "at least 15" in weak_new.stderr, weak_new
        assert snapshot(data_dir) == before
        only_old = pilot(["password", "change", "--password-file", str(old)],
                         agent.env("pilot"), nexus)
        assert only_old.returncode == 2 and "--new-password-file" in only_old.stderr

        # stdin: first line old, second line new.
        changed = pilot(["password", "change", "--password-stdin", "--output", "json"],
                        agent.env("pilot"), nexus, stdin=f"{TEST_PASSWORD}\n{NEW_PASSWORD}\n")
        assert changed.returncode == 0, changed
        assert json.loads(changed.stdout)["generations"] == [1]
        after = snapshot(data_dir)
        assert after[BACKUP] != before[BACKUP]
        assert after[BACKUP + ".prev"] == before[BACKUP]  # the previous copy is kept
        verified = pilot(["backup", "verify", "--password-file", str(new)], agent.env("pilot"),
                         nexus)
        assert verified.returncode == 0, verified

        nexus = restart(agent, nexus)
        stale = recover(agent, nexus, old)
        assert stale.returncode == 8 and WRONG_PASSWORD_MSG in stale.stderr, stale
        result = recover(agent, nexus, new)
        assert result.returncode == 0, result
        assert json.loads(result.stdout.splitlines()[-1])["root_key_fingerprint"] == fp
        events = [(e["action"], e["outcome"]) for e in audit_events(data_dir)
                  if e["action"] == "password.change"]
        assert events == [("password.change", "wrong_password"),
                          ("password.change", "password_rejected"),
                          ("password.change", "ok")]
    finally:
        nexus.stop()

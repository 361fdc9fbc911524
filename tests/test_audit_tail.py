"""The end of the audit trail: a torn last line (a write cut short by a full disk or a
crash) never stops Nexus from starting nor breaks `spike audit verify` for good; start-up
reads only the tail of the trail; caller and target fields are bounded and escaped.

Real parts: a real Nexus process on a prepared trail, the real `spike audit verify`, the
real audit writer. Self-contained (old public API only) so that it runs on old code.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nexus.audit import AuditLog
from spike.errors import SpikeError
from tests.harness import DevAgent, Nexus, base_env, pilot

CUT_MID_UTF8 = b'{"action":"secret.get","caller":"spiffe://spike.internal/caf\xc3'
CUT_ASCII = b'{"action":"secret.put","caller":"spiffe://spike.internal/w","tar'


def write_trail(path: Path, n: int = 3) -> None:
    log = AuditLog(str(path))
    for i in range(n):
        log.record("secret.get", caller=f"spiffe://spike.internal/w{i}", target=f"apps/{i}",
                   outcome="ok")
    log.close()


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().decode().splitlines()
            if line.strip()]


def verify(path: Path) -> tuple[int, dict[str, Any], str]:
    result = pilot(["audit", "verify", str(path), "--output", "json"], base_env())
    return result.returncode, json.loads(result.stdout.splitlines()[-1]), result.stderr


def assert_intact(path: Path) -> int:
    code, out, err = verify(path)
    assert (code, out["ok"]) == (0, True), (out, err)
    return int(out["lines"])


@pytest.fixture()
def trail(data_dir: Path) -> Path:
    path = data_dir / "audit.jsonl"
    write_trail(path)
    return path


def last_line(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 4096))
        return fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]


def wait_until(condition: Callable[[], bool], nexus: Nexus, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if nexus.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("condition not reached:\n" + "".join(nexus.lines[-30:]))
        time.sleep(0.05)


def run_nexus(agent: DevAgent, data_dir: Path, args: tuple[str, ...] = ()) -> Nexus:
    """Start a real Nexus on ``data_dir`` (listening, or this raises), stop it cleanly."""
    nexus = Nexus(data_dir, agent.env("nexus"), args=args, wait=False)
    try:
        nexus.wait_listening()
    finally:
        nexus.stop()
    return nexus


# ------------------------------------------------------------------ Nexus start-up


@pytest.mark.parametrize("torn", [CUT_MID_UTF8, CUT_ASCII], ids=["mid-utf8", "ascii"])
def test_nexus_starts_on_a_torn_trail_and_moves_the_bytes_aside(
        agent: DevAgent, data_dir: Path, trail: Path, torn: bytes) -> None:
    """Before: a UTF-8 sequence cut in half stopped Nexus from starting; an ASCII torn line
    had the next event appended to it, so `spike audit verify` failed for good."""
    good = trail.read_bytes()
    with trail.open("ab") as fh:
        fh.write(torn)
    nexus = run_nexus(agent, data_dir)
    moved = trail.with_name(trail.name + ".torn")
    assert moved.read_bytes() == torn  # every byte kept, byte for byte
    assert trail.read_bytes().startswith(good)  # the good part untouched
    assert_intact(trail)  # the chain goes on from the last complete line
    trail_events = events(trail)
    record = trail_events[3]  # the first event after the good part
    assert record["action"] == "audit.torn_tail" and record["prev"] == trail_events[2]["hash"]
    assert {"nexus.start", "nexus.stop"} <= {e["action"] for e in trail_events[4:]}
    detail = record["detail"]
    assert detail["torn_bytes"] == len(torn) and detail["moved_to"] == moved.name
    assert detail["offset"] == len(good)
    warned = [e for e in nexus.log_events() if "torn" in str(e.get("event", ""))]
    assert warned and warned[0]["torn_bytes"] == len(torn)


def test_a_disk_filling_mid_line_leaves_a_tail_the_next_start_repairs(
        agent: DevAgent, data_dir: Path) -> None:
    """A real full disk: RLIMIT_FSIZE of the running Nexus is lowered to a few bytes past the
    trail's end (its other files are far smaller: only the trail can hit it), so the next
    line is cut mid-way, as on a disk that fills, and the process dies on the failed
    write. The next start keeps the cut bytes in .torn and chains on."""
    path = data_dir / "audit.jsonl"
    write_trail(path, 15_000)  # ~3 MiB: bigger than the store and backup will grow here
    nexus = Nexus(data_dir, agent.env("nexus"))
    try:
        wait_until(lambda: b'"nexus.start"' in last_line(path), nexus)
        _, hard = resource.prlimit(nexus.proc.pid, resource.RLIMIT_FSIZE)
        size = -1
        while size != path.stat().st_size:  # set against the size no line grew past meanwhile
            size = path.stat().st_size
            resource.prlimit(nexus.proc.pid, resource.RLIMIT_FSIZE, (size + 40, hard))
    finally:
        nexus.stop()  # its next line (nexus.stop, say) cannot be written whole
    # The failed write at stop is a clean error and exit 1, not a traceback.
    assert nexus.proc.returncode == 1
    assert not any("Traceback" in line for line in nexus.lines), nexus.lines[-5:]
    assert any(e.get("event") == "cannot write the audit trail at stop"
               for e in nexus.log_events())
    data = path.read_bytes()
    assert len(data) == size + 40 and not data.endswith(b"\n")  # torn, mid-line
    torn = data[data.rfind(b"\n") + 1:]
    code, out, _ = verify(path)
    assert code == 12 and out["torn_tail"]["bytes"] == len(torn)
    run_nexus(agent, data_dir)
    assert path.with_name(path.name + ".torn").read_bytes() == torn
    assert assert_intact(path) > 15_000


def test_a_torn_tail_that_cannot_be_moved_aside_changes_nothing(
        trail: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is still full at start: a clear error, the trail as it was, no partial .torn."""
    with trail.open("ab") as fh:
        fh.write(CUT_ASCII)
    before = trail.read_bytes()
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".torn"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SpikeError, match=r"cannot be moved aside.*No space left"):
        AuditLog(str(trail))
    monkeypatch.undo()
    assert trail.read_bytes() == before
    assert not trail.with_name(trail.name + ".torn").exists()


def test_an_existing_torn_file_is_never_overwritten(trail: Path) -> None:
    first = trail.with_name(trail.name + ".torn")
    first.write_bytes(b"an earlier torn tail")
    with trail.open("ab") as fh:
        fh.write(CUT_ASCII)
    AuditLog(str(trail)).close()
    assert first.read_bytes() == b"an earlier torn tail"
    assert trail.with_name(trail.name + ".torn.1").read_bytes() == CUT_ASCII
    assert assert_intact(trail) == 4


def test_a_trail_that_is_only_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(CUT_MID_UTF8)
    log = AuditLog(str(path))
    log.record("secret.get", caller="c", outcome="ok")
    log.close()
    assert path.with_name(path.name + ".torn").read_bytes() == CUT_MID_UTF8
    assert [e["action"] for e in events(path)] == ["audit.torn_tail", "secret.get"]
    assert events(path)[0]["prev"] == "0" * 64
    assert assert_intact(path) == 2


def test_nexus_refuses_to_start_on_a_damaged_last_line(
        agent: DevAgent, data_dir: Path, trail: Path) -> None:
    """A complete last line that is not an event is damage, not a torn write: Nexus does
    not guess where the chain goes on; it says so (exit 1, no traceback)."""
    with trail.open("ab") as fh:
        fh.write(b'{"action": "edited by hand"\n')
    nexus = Nexus(data_dir, agent.env("nexus"), wait=False)
    try:
        code = nexus.proc.wait(120)
    except subprocess.TimeoutExpired:
        nexus.stop()
        pytest.fail("Nexus started on a trail whose last line is not an event")
    text = "".join(nexus.lines)
    assert code == 1 and "not a sealed audit event" in text and "Traceback" not in text


def test_a_second_nexus_on_the_same_trail_is_refused(agent: DevAgent, data_dir: Path,
                                                      tmp_path: Path) -> None:
    """Two writers would fork the chain (and one could cut the other's torn tail)."""
    first = Nexus(data_dir, agent.env("nexus"))
    other_dir = Path(str(data_dir) + "-b")
    try:
        second = Nexus(other_dir, agent.env("nexus"),
                       args=["--audit-file", str(data_dir / "audit.jsonl")], wait=False)
        try:
            code = second.proc.wait(120)
        except subprocess.TimeoutExpired:
            second.stop()
            pytest.fail("a second Nexus started on a trail in use")
        assert code == 1 and "in use by another process" in "".join(second.lines)
    finally:
        first.stop()
        subprocess.run(["rm", "-rf", str(other_dir)], check=False)
    assert assert_intact(data_dir / "audit.jsonl") >= 2


# ------------------------------------------------------------------ reading only the tail


def test_start_up_reads_only_the_tail(agent: DevAgent, data_dir: Path) -> None:
    """An early part that is not even UTF-8 (8 MiB of it) is never read at start-up."""
    path = data_dir / "audit.jsonl"
    tail = data_dir / "tail.jsonl"
    write_trail(tail, 2)
    with path.open("wb") as fh:
        for _ in range(8):
            fh.write(b"\xff" * (1 << 20) + b"\n")
        fh.write(tail.read_bytes())
    tail.unlink()
    last = events_of_tail(path)[-1]
    run_nexus(agent, data_dir)
    appended = events_of_tail(path)[2:]
    assert {"nexus.start", "nexus.stop"} <= {e["action"] for e in appended}
    assert appended[0]["prev"] == last["hash"]  # chained on from the real last line


def events_of_tail(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    return [json.loads(line) for line in data[data.rfind(b"\xff") + 2:].decode().splitlines()]


def test_start_up_bytes_read_do_not_grow_with_the_trail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    for i in range(30_000):
        log.record("secret.get", caller="spiffe://spike.internal/w", target=f"apps/{i}",
                   outcome="ok")
    log.close()
    with path.open("ab") as fh:
        fh.write(CUT_ASCII)
    size = path.stat().st_size
    assert size > 5_000_000
    read = {"bytes": 0}
    real_read, real_pread = os.read, os.pread

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read["bytes"] += len(data)
        return data

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(os, "read", counting_read)
    monkeypatch.setattr(os, "pread", counting_pread)
    AuditLog(str(path)).close()
    monkeypatch.undo()
    assert read["bytes"] < 300_000, read
    assert path.with_name(path.name + ".torn").read_bytes() == CUT_ASCII
    assert assert_intact(path) == 30_001


# ------------------------------------------------------------------ spike audit verify


@pytest.mark.parametrize("torn", [CUT_MID_UTF8, CUT_ASCII], ids=["mid-utf8", "ascii"])
def test_verify_reports_a_torn_tail_distinctly(trail: Path, torn: bytes) -> None:
    with trail.open("ab") as fh:
        fh.write(torn)
    code, out, err = verify(trail)
    assert code == 12, (code, out, err)  # not 1, a broken chain
    assert out["ok"] is False and out["lines"] == 3 and out["bad_line"] == 4
    assert out["torn_tail"] == {"line": 4, "bytes": len(torn)}
    assert "torn last line" in err and ".torn" in err
    text = pilot(["audit", "verify", str(trail)], base_env())
    assert text.returncode == 12 and "torn last line" in text.stderr
    assert "Traceback" not in text.stderr


def test_verify_lists_the_torn_tails_moved_aside_and_checks_their_bytes(trail: Path) -> None:
    with trail.open("ab") as fh:
        fh.write(CUT_MID_UTF8)
    AuditLog(str(trail)).close()
    moved = trail.with_name(trail.name + ".torn")
    code, out, _ = verify(trail)
    assert code == 0 and out["moved_tails"] == [
        {"line": 4, "file": str(moved), "bytes": len(CUT_MID_UTF8), "state": "matches"}]
    text = pilot(["audit", "verify", str(trail)], base_env())
    assert text.returncode == 0 and "moved aside" in text.stdout and "(matches)" in text.stdout
    moved.write_bytes(b"something else")
    assert verify(trail)[1]["moved_tails"][0]["state"] == "differs"
    moved.unlink()
    assert verify(trail)[1]["moved_tails"][0]["state"] == "missing"


def test_verify_still_reports_a_broken_chain_as_such(trail: Path) -> None:
    lines = trail.read_bytes().splitlines(keepends=True)
    del lines[1]
    trail.write_bytes(b"".join(lines) + CUT_ASCII)
    code, out, _ = verify(trail)
    assert code == 1 and out["bad_line"] == 2 and out["torn_tail"] is None


def test_verify_names_a_complete_line_that_is_not_utf8(trail: Path) -> None:
    with trail.open("ab") as fh:
        fh.write(b"\xff\xfe\n")
    code, out, _ = verify(trail)
    assert code == 1 and out["bad_line"] == 4 and "UTF-8" in out["error"]


# ------------------------------------------------------------------ bounded identities


def test_caller_and_target_are_bounded_and_escaped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    huge = "spiffe://spike.internal/" + "é" * 100_000
    log.record("rpc.denied", caller=huge, target="t" * 50_000, outcome="denied")
    log.record("rpc.denied", caller="spiffe://spike.internal/spike/pilot/role/superuser"
               "\x00/workload/x\n\x1b[2J\u202e", target="a\\b\r", outcome="denied")
    log.close()
    first, second = events(path)
    for field in ("caller", "target"):
        assert len(first[field].encode()) <= 2048
    assert first["caller"].endswith(f"({len(huge.encode())} bytes)")
    assert first["target"].endswith("(50000 bytes)")
    assert second["caller"] == ("spiffe://spike.internal/spike/pilot/role/superuser"
                                "\\x00/workload/x\\n\\x1b[2J\\u202e")
    assert second["target"] == "a\\\\b\\r"
    for event in (first, second):
        assert all(ch.isprintable() for ch in event["caller"] + event["target"])
    assert assert_intact(path) == 2

"""The password backoff's own user experience (issue 11, item 17).

A typo, then the right password straight after, used to be refused with
``spike: RESOURCE_EXHAUSTED: too many failed attempts: retry in 0.2 s`` (exit 1). Now the
backoff is served in the wrong-password answer (outside the lifecycle lock), so the next
attempt is accepted at once; a concurrent guess meanwhile is still refused, with its own exit
code (9) and no gRPC code name; "already initialized" / "already unsealed" exit 10.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from nexus.core import errors
from nexus.core.keymanager import KeyManager
from pilot.client import translate
from spike.errors import ErrorKind
from tests.harness import (
    PY,
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    eventually,
    open_keys,
    pilot,
    pilot_json,
)

PASSWORD = TEST_PASSWORD.encode()
WRONG = "tangerine glacier ladder ninety"
CODE_NAMES = [c.name for c in grpc.StatusCode]


def files(tmp: Path) -> tuple[Path, Path]:
    pw, wrong = tmp / "pw", tmp / "wrong"
    pw.write_text(TEST_PASSWORD + "\n")
    wrong.write_text(WRONG + "\n")
    return pw, wrong


# ---------------------------------------------------------------- the reported case


def test_a_typo_then_the_right_password_at_once(agent: DevAgent, data_dir: Path,
                                                 tmp: Path) -> None:
    pw, wrong = files(tmp)
    args = ["--recover-backoff-seconds", "0.5"]
    nexus = Nexus(data_dir, agent.env("nexus"), args=args)
    su = agent.env("pilot")
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        nexus.kill()
        nexus = Nexus(data_dir, agent.env("nexus"), args=args)
        typo = pilot(["recover", "--password-file", str(wrong)], su, nexus)
        assert typo.returncode == 8 and "password does not open" in typo.stderr, typo
        right = pilot(["recover", "--password-file", str(pw), "--output", "json"], su, nexus)
        assert right.returncode == 0, right
        assert json.loads(right.stdout)["state"] == "unsealed"
        # The same for backup verify and password change while unsealed.
        typo = pilot(["backup", "verify", "--password-file", str(wrong)], su, nexus)
        assert typo.returncode == 8, typo
        right = pilot(["backup", "verify", "--password-file", str(pw)], su, nexus)
        assert right.returncode == 0, right
        outcomes = [json.loads(line)["outcome"] for line in
                    (data_dir / "audit.jsonl").read_text().splitlines()
                    if json.loads(line)["action"] == "recover"]
        assert outcomes == ["wrong_password", "ok"], outcomes
    finally:
        nexus.stop()


def test_already_initialized_and_already_unsealed_exit_10(agent: DevAgent, data_dir: Path,
                                                          tmp: Path) -> None:
    pw, _ = files(tmp)
    nexus = Nexus(data_dir, agent.env("nexus"))
    su = agent.env("pilot")
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        again = pilot(["init", "--password-file", str(pw)], su, nexus)
        assert again.returncode == 10 and "already initialized" in again.stderr, again
        unsealed = pilot(["recover", "--password-file", str(pw)], su, nexus)
        assert unsealed.returncode == 10 and "already unsealed" in unsealed.stderr, unsealed
        for result in (again, unsealed):
            assert not any(name in result.stderr for name in CODE_NAMES), result.stderr
    finally:
        nexus.stop()


def test_a_concurrent_guess_is_refused_with_exit_9_and_plain_words(
    agent: DevAgent, data_dir: Path, tmp: Path
) -> None:
    pw, wrong = files(tmp)
    args = ["--recover-backoff-seconds", "300"]
    nexus = Nexus(data_dir, agent.env("nexus"), args=args)
    su = agent.env("pilot")
    try:
        pilot_json(["init", "--password-file", str(pw), "--output", "json"], su, nexus)
        nexus.kill()
        nexus = Nexus(data_dir, agent.env("nexus"), args=args)
        env = dict(su, SPIKE_NEXUS_ADDR=nexus.address)
        # The wrong answer is held back while the delay runs: meanwhile another guess...
        held = subprocess.Popen([PY, "-m", "pilot", "recover", "--password-file", str(wrong)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            eventually(lambda: any(e.get("event") == "wrong password"
                                   for e in nexus.log_events()), "the first failure")
            blocked = pilot(["recover", "--password-file", str(pw), "--output", "json"],
                            su, nexus)
            assert blocked.returncode == 9, blocked
            assert "too many failed attempts: retry in" in blocked.stderr
            assert not any(name in blocked.stderr for name in CODE_NAMES), blocked.stderr
            assert json.loads(blocked.stdout)["exit_code"] == 9
        finally:
            nexus.stop()  # wakes the held-back answer
            held.communicate(timeout=60)
    finally:
        nexus.stop()


# ---------------------------------------------------------------- in process


def manager(tmp: Path, backoff: float) -> KeyManager:
    return open_keys(tmp, backoff=backoff)


def test_the_held_back_answer_does_not_hold_the_lifecycle_lock(tmp_path: Path) -> None:
    first = manager(tmp_path, 300.0)
    first.init(PASSWORD)
    first.seal()
    first._store.close()
    keys = manager(tmp_path, 300.0)
    done = threading.Event()

    def wrong() -> None:
        try:
            keys.recover(b"a wrong but well formed password")
        except errors.WrongPassword:
            done.set()

    worker = threading.Thread(target=wrong)
    worker.start()
    eventually(lambda: keys.recover_failures == 1, "the failure")
    assert not done.is_set()  # still held back (30 s of a 300 s delay)
    # The lock is free: a lifecycle call that needs it answers at once.
    acquired = keys._lock.acquire(timeout=30)
    assert acquired
    keys._lock.release()
    with pytest.raises(errors.TooManyAttempts):
        keys.recover(PASSWORD)
    keys.seal()  # shutdown wakes the held-back answer
    worker.join(30)
    assert done.is_set()


# ---------------------------------------------------------------- every status code


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, detail: str, kind: str) -> None:
        self._code, self._detail, self._kind = code, detail, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._detail

    def trailing_metadata(self) -> Any:
        return (("spike-error-kind", self._kind),) if self._kind else ()


# No kind, every kind Nexus names, and one a newer Nexus might send.
KINDS = ["", *(kind.value for kind in ErrorKind), "a_kind_from_a_newer_nexus"]


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("detail", ["", "something went wrong"])
def test_no_grpc_code_name_reaches_the_user(code: grpc.StatusCode, kind: str,
                                            detail: str) -> None:
    err = translate(FakeRpcError(code, detail, kind), "127.0.0.1:8553")
    shown = f"{err} {err.hint}"
    assert not any(name in shown for name in CODE_NAMES), shown
    assert str(err).strip()


def test_backoff_and_already_have_their_exit_codes() -> None:
    backoff = translate(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     "too many failed attempts: retry in 0.2 s", "backoff"), "x")
    assert backoff.exit_code == 9 and "retry in 0.2 s" in str(backoff)
    for kind in ("already_initialized", "already_unsealed"):
        done = translate(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "already", kind),
                         "x")
        assert done.exit_code == 10

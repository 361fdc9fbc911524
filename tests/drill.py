"""`make drill`: the recovery practice drill, run automatically on a throwaway instance.

Walks the steps of docs/runbooks/drill.md — kill -> restart -> recover -> verify, then
the same after losing the server's backup file — and prints a pass/fail report.
Production Argon2id parameters; nothing touches a real deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.harness import DevAgent, Nexus, pilot, short_tmpdir

CANARIES = 20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


class Drill:
    def __init__(self) -> None:
        self.dir = short_tmpdir("drill-")
        self.data_dir = self.dir / "data"
        self.agent = DevAgent()
        self.nexus: Nexus | None = None
        self.checks: list[Check] = []
        self.password_file = self.dir / "password"
        # A fresh random passphrase: the drill never uses a real one.
        words = [secrets.token_hex(3) for _ in range(5)]
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("drill " + " ".join(words) + "\n")
        self.canaries: dict[str, dict[str, str]] = {
            f"drill/canary-{i:02d}": {"value": secrets.token_urlsafe(24)}
            for i in range(CANARIES)
        }

    def spike(self, *args: str, who: str = "pilot") -> tuple[int, str, str]:
        result = pilot(list(args), self.agent.env(who), self.nexus)
        return result.returncode, result.stdout, result.stderr

    def check(self, name: str, action: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail = action()
            ok = True
        except Exception as exc:  # a drill reports, it does not crash
            detail, ok = str(exc), False
        self.checks.append(Check(name, ok, detail, time.monotonic() - started))
        mark = "PASS" if ok else "FAIL"
        print(f"[{mark}] {name}: {detail}", flush=True)
        return ok

    def expect(self, code: int, *args: str, who: str = "pilot") -> str:
        got, out, err = self.spike(*args, who=who)
        if got != code:
            raise RuntimeError(f"`spike {' '.join(args)}` exited {got}: {err.strip()[-300:]}")
        return out

    def start(self) -> str:
        self.nexus = Nexus(self.data_dir, self.agent.env("nexus"), insecure_kdf=False)
        return f"listening on {self.nexus.address}"

    def kill(self) -> str:
        assert self.nexus is not None
        self.nexus.kill(signal.SIGKILL)
        return "Nexus killed with SIGKILL"

    def state(self, wanted: str) -> str:
        status = json.loads(self.expect(0, "status", "--output", "json"))
        if status["state"] != wanted:
            raise RuntimeError(f"state is {status['state']}, expected {wanted}")
        return f"state {wanted}, generation {status['root_key_generation']}"

    def canaries_intact(self) -> str:
        for path, data in self.canaries.items():
            got = json.loads(self.expect(0, "secret", "get", path, "--output", "json"))
            if got["data"] != data:
                raise RuntimeError(f"{path} differs after recovery")
        return f"{len(self.canaries)} canary secrets read back byte for byte"

    def run(self) -> bool:
        exported = self.dir / "exported.backup"
        pw = str(self.password_file)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("start a throwaway Nexus", self.start),
            ("initialize", lambda: self.expect(0, "init", "--password-file", pw).strip()),
            ("write canary secrets", self._write_canaries),
            ("export the backup off-host", lambda: self.expect(
                0, "backup", "export", "--out", str(exported)).strip()),
            ("kill -9", self.kill),
            ("restart", self.start),
            ("Nexus comes back sealed", lambda: self.state("sealed")),
            ("recover with the password", lambda: self.expect(
                0, "recover", "--password-file", pw).strip()),
            ("canaries intact", self.canaries_intact),
            ("backup verifies with the password", lambda: self.expect(
                0, "backup", "verify", "--password-file", pw).strip()),
            ("kill -9 and lose the server's backup file", self._lose_backup),
            ("restart", self.start),
            ("recover from the exported copy", lambda: self.expect(
                0, "recover", "--backup-file", str(exported), "--password-file", pw).strip()),
            ("server backup file restored", self._backup_restored),
            ("canaries intact", self.canaries_intact),
            ("audit trail intact", lambda: self.expect(
                0, "audit", "verify", str(self.data_dir / "audit.jsonl")).strip()),
        ]
        return all(self.check(name, action) for name, action in steps)  # stops at a failure

    def _write_canaries(self) -> str:
        for path, data in self.canaries.items():
            self.expect(0, "secret", "put", path, f"value={data['value']}")
        return f"{len(self.canaries)} written"

    def _lose_backup(self) -> str:
        self.kill()
        (self.data_dir / "root-key.backup").unlink()
        return "root-key.backup deleted"

    def _backup_restored(self) -> str:
        if not (self.data_dir / "root-key.backup").exists():
            raise RuntimeError("the server's backup file was not restored")
        return self.state("unsealed")

    def close(self) -> None:
        if self.nexus is not None:
            self.nexus.stop()
        self.agent.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def report(self, ok: bool) -> None:
        print("\n=== recovery drill report")
        for c in self.checks:
            print(f"  {'PASS' if c.ok else 'FAIL'}  {c.seconds:6.2f}s  {c.name}")
        total = sum(c.seconds for c in self.checks)
        print(f"  {'PASSED' if ok else 'FAILED'}: {sum(c.ok for c in self.checks)}/"
              f"{len(self.checks)} steps in {total:.1f} s")


def main() -> int:
    drill = Drill()
    ok = False
    try:
        ok = drill.run()
    finally:
        drill.close()
        drill.report(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

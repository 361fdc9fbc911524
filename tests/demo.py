"""`make demo`: the whole story on a fresh machine with embedded defaults.

Dev agent (development only), Nexus on SQLite in a temporary directory with
production Argon2id parameters, then: init, policies and secrets, a workload
reading its secret and being denied another, a rotation of a few thousand
secrets with its progress bar, kill -9, restart, recover, everything still
there, status, and the audit trail verified.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.harness import PY, DevAgent, Nexus, pilot, short_tmpdir

PASSWORD = "demo river lantern copper meadow"  # noqa: S105 - demo only
BULK = 3000


def step(title: str) -> None:
    print(f"\n\033[1m=== {title}\033[0m", flush=True)


class Demo:
    def __init__(self) -> None:
        self.dir = short_tmpdir("demo-")
        self.data_dir = self.dir / "data"
        self.agent = DevAgent()
        self.nexus: Nexus | None = None
        self.password_file = self.dir / "password"
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(PASSWORD + "\n")

    def start_nexus(self) -> Nexus:
        self.nexus = Nexus(self.data_dir, self.agent.env("nexus"), insecure_kdf=False)
        print(f"spike-nexus pid {self.nexus.proc.pid} listening on {self.nexus.address}")
        return self.nexus

    def spike(self, *args: str, who: str = "pilot", expect: int = 0, show: bool = True) -> str:
        print(f"$ spike {' '.join(args)}" + ("" if who == "pilot" else f"    # as {who}"),
              flush=True)
        result = pilot(list(args), self.agent.env(who), self.nexus)
        if show:
            sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode != expect:
            raise SystemExit(f"demo failed: `spike {' '.join(args)}` exited "
                             f"{result.returncode}, expected {expect}")
        return result.stdout

    def spike_live(self, *args: str) -> int:
        """Run Pilot with the terminal attached, so the progress bar is live."""
        assert self.nexus is not None
        print(f"$ spike {' '.join(args)}", flush=True)
        env = self.agent.env("pilot")
        env["SPIKE_NEXUS_ADDR"] = self.nexus.address
        return subprocess.run([PY, "-m", "pilot", *args], env=env, check=False).returncode

    def run(self) -> None:
        step("1. development SPIFFE agent and Nexus (SQLite, temp dir)")
        print(f"spike-dev-agent sockets in {self.agent.dir} (DEVELOPMENT ONLY)")
        self.start_nexus()
        self.spike("status")

        step("2. init: Nexus generates the root key; the password seals its backup")
        self.spike("init", "--password-file", str(self.password_file))
        backup_copy = self.dir / "offsite.backup"
        self.spike("backup", "export", "--out", str(backup_copy))

        step("3. a policy and some secrets")
        self.spike("policy", "put", "demo-app", "--spiffe-id-pattern",
                   r"spiffe://spike\.internal/workload/demo", "--path-pattern",
                   r"apps/demo/.*", "--permissions", "read,list")
        self.spike("secret", "put", "apps/demo/db", "user=app", "password=@" + str(
            self._value_file("db-password", "s3cr3t-db-pass")))
        self.spike("secret", "put", "apps/billing/api", "token=@" + str(
            self._value_file("billing-token", "billing-token-value")))

        step("4. a workload reads its own secret, and is denied another")
        self.spike("secret", "get", "apps/demo/db", who="workload")
        self.spike("secret", "get", "apps/billing/api", who="workload", expect=4)

        step(f"5. bulk import of {BULK} secrets, then a root key rotation")
        bulk = self.dir / "bulk.jsonl"
        with bulk.open("w") as fh:
            for i in range(BULK):
                fh.write(json.dumps({"path": f"apps/bulk/item-{i:05d}",
                                     "data": {"value": f"bulk-value-{i}"}}) + "\n")
        self.spike("secret", "import", "--file", str(bulk))
        code = self.spike_live("rotate", "--max-rate", "2000")
        if code != 0:
            raise SystemExit(f"demo failed: rotation exited {code}")
        before = self.spike("secret", "get", "apps/demo/db", "--output", "json", show=False)
        status = json.loads(self.spike("status", "--output", "json", show=False))
        fingerprint = status["root_key_fingerprint"]
        print(f"root key generation {status['root_key_generation']}, fingerprint "
              f"{fingerprint}; backup holds {status['backup']['generations']}")

        step("6. kill -9 Nexus, restart it: the root key was only in memory")
        assert self.nexus is not None
        self.nexus.kill(signal.SIGKILL)
        print("spike-nexus killed with SIGKILL")
        self.start_nexus()
        self.spike("status")
        self.spike("secret", "get", "apps/demo/db", expect=5)

        step("7. recover with the password")
        self.spike("recover", "--password-file", str(self.password_file))
        after = self.spike("secret", "get", "apps/demo/db", "--output", "json", show=False)
        if json.loads(after) != json.loads(before):
            raise SystemExit("demo failed: the secret changed across the restart")
        print("apps/demo/db reads back byte for byte after restart and recovery")
        listed = json.loads(self.spike("secret", "list", "apps/bulk/", "--output", "json",
                                       show=False))["paths"]
        print(f"{len(listed)} bulk secrets still listed")
        status = json.loads(self.spike("status", "--output", "json", show=False))
        if status["root_key_fingerprint"] != fingerprint:
            raise SystemExit("demo failed: a different root key came back")
        self.spike("status")
        self.spike("backup", "verify", "--password-file", str(self.password_file))

        step("8. the audit trail is intact")
        self.spike("audit", "verify", str(self.data_dir / "audit.jsonl"))

    def _value_file(self, name: str, value: str) -> object:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        return path

    def close(self) -> None:
        step("stop")
        if self.nexus is not None:
            print(f"spike-nexus exited {self.nexus.stop()} (SIGTERM)")
        print(f"spike-dev-agent exited {self.agent.stop()}")
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    started = time.monotonic()
    demo = Demo()
    try:
        demo.run()
    finally:
        demo.close()
    print(f"\ndemo passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

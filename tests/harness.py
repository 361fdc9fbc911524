"""Real processes for integration tests: the dev agent, Nexus, Pilot.

Unix socket paths must stay short, so every directory here lives under a
short /tmp prefix rather than pytest's long tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TEST_PASSWORD = "correct horse battery staple orbit"  # noqa: S105 - a test fixture


def short_tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_", "SPIFFE_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DevAgent:
    """spike-dev-agent in a subprocess; sockets under ``dir``."""

    def __init__(self, ttl: int = 3600, extra: Sequence[str] = (), ca_dir: Path | None = None):
        self.dir = short_tmpdir("sa-")
        self.ca_dir = ca_dir
        args = [PY, "-m", "devagent", "--dir", str(self.dir), "--ttl", str(ttl), *extra]
        if ca_dir is not None:
            args += ["--ca-dir", str(ca_dir)]
        self.proc = subprocess.Popen(
            args, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.proc.stdout is not None
        # No deadline on a "ready" that did come: a loaded machine (nice -n 19 beside a CPU
        # hog) can take over 20 s to start Python; an agent that dies gives EOF here.
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"dev agent did not start: {line!r} {''.join(self._stderr)}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def socket(self, name: str) -> str:
        return f"unix://{self.dir / (name + '.sock')}"

    def env(self, name: str) -> dict[str, str]:
        env = base_env()
        env["SPIFFE_ENDPOINT_SOCKET"] = self.socket(name)
        return env

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


class Nexus:
    """spike-nexus in a subprocess on 127.0.0.1:0; its stderr is kept for assertions."""

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, str],
        args: Sequence[str] = (),
        wait: bool = True,
        insecure_kdf: bool = True,
        preexec_fn: Any = None,
    ) -> None:
        """``preexec_fn`` runs in the child before exec (e.g. to set resource limits)."""
        self.data_dir = data_dir
        # Cheap Argon2id for tests; benchmarks pass insecure_kdf=False for production costs.
        self.args = [
            PY, "-m", "nexus", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
            *(["--insecure-test-kdf"] if insecure_kdf else []), *args,
        ]
        self.env = dict(env)
        self.lines: list[str] = []
        self.address = ""
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, preexec_fn=preexec_fn,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if wait:
            self.wait_listening()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"nexus listening"' in line:
                self.address = json.loads(line)["address"]
                self._listening.set()

    def wait_listening(self, timeout: float = 180) -> None:  # generous: loaded machines
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nexus did not start:\n" + "".join(self.lines[-30:]))

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)


def pilot(
    args: Sequence[str],
    env: Mapping[str, str],
    nexus: Nexus | str | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `spike ARGS` as a real process."""
    env = dict(env)
    if nexus is not None:
        env["SPIKE_NEXUS_ADDR"] = nexus if isinstance(nexus, str) else nexus.address
    return subprocess.run(
        [PY, "-m", "pilot", *args], env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )


def pilot_json(*args: Any, **kwargs: Any) -> dict[str, Any]:
    result = pilot(*args, **kwargs)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout.splitlines()[-1])

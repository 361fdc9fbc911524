"""Helpers for tests and scripts: run ``spike-dev-agent`` as a subprocess and wait for it.

    with running_agent(ttl=60) as agent:
        source = X509Source(socket_path=agent.endpoint("nexus"), timeout_in_seconds=5)

Socket paths must stay short (unix sockets allow ~104 bytes), so by default the agent
directory is a fresh ``sa-XXXX`` directory under ``/tmp`` (falling back to the system
temporary directory), not a long pytest ``tmp_path``.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["AgentProcess", "AgentStartError", "running_agent", "short_tempdir", "start_agent"]


class AgentStartError(RuntimeError):
    """The agent exited or did not become ready in time."""


def short_tempdir(prefix: str = "sa-") -> Path:
    """A new private directory with a short path, suitable for unix sockets."""
    base = "/tmp" if os.path.isdir("/tmp") else None  # noqa: S108 (short path on purpose)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@dataclass
class AgentProcess:
    """A running agent subprocess."""

    process: subprocess.Popen[bytes]
    directory: Path
    stderr_file: IO[bytes]
    ready_line: str = ""
    _owned_dirs: list[Path] = field(default_factory=list)

    def socket(self, name: str) -> Path:
        return self.directory / f"{name}.sock"

    def endpoint(self, name: str) -> str:
        """``unix:///...`` address for py-spiffe / ``SPIFFE_ENDPOINT_SOCKET``."""
        return f"unix://{self.socket(name)}"

    @property
    def bundle_path(self) -> Path:
        return self.directory / "bundle.pem"

    def stderr_text(self) -> str:
        self.stderr_file.flush()
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the agent and return its exit status (SIGKILL after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def cleanup(self) -> None:
        """Stop the agent if needed and delete directories this helper created."""
        self.stop()
        self.stderr_file.close()
        for d in self._owned_dirs:
            shutil.rmtree(d, ignore_errors=True)


def start_agent(
    directory: str | os.PathLike[str] | None = None,
    *,
    ttl: int | None = None,
    args: Sequence[str] = (),
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    """Start ``python -m devagent --dir DIR ...`` and wait for its ``ready`` line."""
    owned: list[Path] = []
    if directory is None:
        parent = short_tempdir()
        owned.append(parent)
        agent_dir = parent / "agent"
    else:
        agent_dir = Path(directory)
    cmd = [sys.executable, "-m", "devagent", "--dir", str(agent_dir)]
    if ttl is not None:
        cmd += ["--ttl", str(ttl)]
    cmd += list(args)
    # a file, not a pipe: logs never block the agent; closed by AgentProcess.cleanup()
    stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr_file, env=env, stdin=subprocess.DEVNULL
    )
    agent = AgentProcess(proc, agent_dir, stderr_file, _owned_dirs=owned)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                agent.cleanup()
                raise AgentStartError(f"agent not ready after {timeout}s:\n{agent.stderr_text()}")
            if not sel.select(min(remaining, 0.2)):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                rc = proc.wait()
                text = agent.stderr_text()
                agent.cleanup()
                raise AgentStartError(f"agent exited with status {rc}:\n{text}")
            buf += chunk
    agent.ready_line = buf.split(b"\n", 1)[0].decode()
    if not agent.ready_line.startswith("ready "):
        agent.cleanup()
        raise AgentStartError(f"unexpected first line from agent: {agent.ready_line!r}")
    return agent


@contextmanager
def running_agent(
    directory: str | os.PathLike[str] | None = None,
    *,
    ttl: int | None = None,
    args: Sequence[str] = (),
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> Iterator[AgentProcess]:
    """Context manager around :func:`start_agent`; stops the agent and cleans up on exit."""
    agent = start_agent(directory, ttl=ttl, args=args, timeout=timeout, env=env)
    try:
        yield agent
    finally:
        agent.cleanup()

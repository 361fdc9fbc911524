"""README's "Running it by hand" runs as written: its shell block, as a bash script, with the
virtualenv's bin first on PATH and Nexus on a free port (SPIKE_NEXUS_ADDR)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def by_hand_script() -> str:
    text = README.read_text()
    section = text.split("## Running it by hand", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]  # the Vault table follows
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "no shell block in README's 'Running it by hand'"
    return "\n".join(blocks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_section_has_what_a_first_day_needs() -> None:
    script = by_hand_script()
    for needed in ("mktemp -d", "printf", "2>\"$DIR/nexus.log\"", "2>\"$DIR/agent.log\"",
                   "spike init --password-file", "spike policy put", "workload.sock",
                   "kill \"$NEXUS\"", "rm -rf \"$DIR\""):
        assert needed in script, needed
    assert "spike-data/" in (ROOT / ".gitignore").read_text().split()
    vault = README.read_text().split("### For Vault users", 1)[1].split("\n## ", 1)[0]
    for word in ("unseal", "spike recover", "tokens", "SVID", "HCL", "RE2", "kv-v2",
                 "audit devices", "audit trail"):
        assert word in vault, word


def test_running_it_by_hand_works_as_written() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_", "SPIKE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SPIKE_NEXUS_ADDR"] = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(["bash", "-c", by_hand_script()], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the script left running
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (out, err)
    assert "s3cret\n" in out, out
    assert "wrote apps/demo/db version 1" in out, out
    assert "completed: generation 2 active" in err, err

"""README's shell walk-throughs run as written: "Running it by hand" and "For Vault users", each
shell block as a bash script, with the virtualenv's bin first on PATH and Nexus on a free port
(SPIKE_NEXUS_ADDR). The scripts check their own outcomes (`test`, exit codes); the test checks
what they printed as well."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BY_HAND = "Running it by hand"
FOR_VAULT_USERS = "For Vault users"


def section(title: str) -> str:
    """The text under README's heading `title`, up to the next heading of any level (lines inside
    code fences are not headings)."""
    lines = README.read_text().splitlines(keepends=True)
    out: list[str] = []
    inside = fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        heading = not fenced and re.match(r"#{1,6} ", line) is not None
        if heading and inside:
            break
        if heading and line.split(" ", 1)[1].strip() == title:
            inside = True
        elif inside:
            out.append(line)
    assert inside, f"no section {title!r} in README"
    return "".join(out)


def section_script(title: str) -> str:
    blocks = re.findall(r"```sh\n(.*?)```", section(title), re.S)
    assert blocks, f"no shell block in README's {title!r}"
    return "\n".join(blocks)


def by_hand_script() -> str:
    return section_script(BY_HAND)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_script(script: str, logs: Path) -> tuple[int, str, str]:
    """Run `script` with bash; its output goes to files, not pipes, so a daemon the script left
    behind (it stopped at a failed check) cannot hold the run open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIFFE_", "SPIKE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SPIKE_NEXUS_ADDR"] = f"127.0.0.1:{free_port()}"
    out_path, err_path = logs / "stdout", logs / "stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT, stdout=out,
                                stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever the script left running
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out_path.read_text(), err_path.read_text()


def test_the_section_has_what_a_first_day_needs() -> None:
    script = by_hand_script()
    for needed in ("mktemp -d", "printf", "2>\"$DIR/nexus.log\"", "2>\"$DIR/agent.log\"",
                   "spike init --password-file", "spike policy put", "workload.sock",
                   "kill \"$NEXUS\"", "rm -rf \"$DIR\""):
        assert needed in script, needed
    assert "spike-data/" in (ROOT / ".gitignore").read_text().split()
    vault = section(FOR_VAULT_USERS)
    for word in ("unseal", "spike recover", "tokens", "SVID", "HCL", "RE2", "kv-v2",
                 "audit devices", "audit trail"):
        assert word in vault, word


# Each Vault command (as a comment) and the SPIKE command that must follow it, before the next one.
VAULT_TO_SPIKE = [
    ("vault operator init", "spike init --password-file"),
    ("vault operator unseal", "spike recover --password-file"),
    ("vault kv put secret/", "spike secret put apps/demo/db"),
    ("vault kv put -cas=1", "--cas 1"),
    ("vault kv get -field=", "spike secret get apps/demo/db --field password"),
    ("vault kv get -version=1", "--version 1 --field password"),
    ("vault kv metadata get", "spike secret metadata apps/demo/db"),
    ("vault kv delete", "spike secret delete apps/demo/db"),
    ("vault kv undelete", "spike secret undelete apps/demo/db --version 2"),
    ("vault kv destroy", "spike secret destroy apps/demo/db --version 1"),
    ("vault policy write", "spike policy put demo-read"),
    ("VAULT_TOKEN=", "workload.sock"),
    ("vault operator rotate", "spike rotate"),
    ("vault audit", "spike audit verify"),
]


def test_the_vault_walk_through_pairs_each_vault_command_with_spike() -> None:
    script = section_script(FOR_VAULT_USERS)
    at = 0
    for vault, spike in VAULT_TO_SPIKE:
        comment = re.compile(r"^# " + re.escape(vault), re.M).search(script, at)
        assert comment is not None, f"no comment '# {vault}' (in this order)"
        nxt = re.compile(r"^# vault|^# VAULT_", re.M).search(script, comment.end())
        counterpart = script[comment.end():nxt.start() if nxt else len(script)]
        assert spike in counterpart, (vault, spike)
        at = comment.end()
    for needed in ("set -euo pipefail", "mktemp -d", "printf", "2>>\"$DIR/nexus.log\"",
                   "2>\"$DIR/agent.log\"", "recover.sock", "kill \"$NEXUS\"", "rm -rf \"$DIR\"",
                   "test \"$("):
        assert needed in script, needed


# What each section's run must have printed: (stdout, stderr) substrings.
EXPECTED = {
    BY_HAND: (["s3cret\n", "wrote apps/demo/db version 1"],
              ["completed: generation 2 active"]),
    FOR_VAULT_USERS: (["initialized: root key generation 1",
                       "unsealed: root key generation 1",
                       "wrote apps/demo/db version 1", "wrote apps/demo/db version 2",
                       "current version 2, oldest 1",
                       "deleted apps/demo/db current version",
                       "undeleted apps/demo/db versions [2]",
                       "destroyed apps/demo/db versions [1]",
                       "hash chain intact"],
                      ["check-and-set failed for apps/demo/db: expected version 1, current is 2",
                       "version 2 of apps/demo/db is deleted",
                       "version 1 of apps/demo/db was destroyed",
                       "permission denied: no policy allows spiffe://spike.internal/workload/demo"
                       " to write apps/demo/db",
                       "completed: generation 2 active"]),
}


@pytest.mark.parametrize("title", [BY_HAND, FOR_VAULT_USERS])
def test_the_section_works_as_written(title: str, tmp_path: Path) -> None:
    rc, out, err = run_script(section_script(title), tmp_path)
    assert rc == 0, (out, err)
    want_out, want_err = EXPECTED[title]
    for text in want_out:
        assert text in out, (text, out)
    for text in want_err:
        assert text in err, (text, err)
    assert "violet anchor drizzle quantum ferry" not in out + err  # the password is never echoed

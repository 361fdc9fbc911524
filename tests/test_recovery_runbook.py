"""docs/runbooks/recovery.md, run step by step as written, after a completed rotation.

Every ``console`` block of the runbook is executed in order against a real Nexus: each ``$``
line runs in bash (``spike`` is Pilot), ``$ echo $?`` checks the previous command's exit code
(otherwise it must be 0), and the lines shown after a command must appear in its output, with
fingerprints, numbers and dates allowed to differ and ``...`` standing for anything. The
runbook's paths are mapped to the test's directories (``/var/lib/spike`` is the data
directory, ``/secure`` a private directory). An HTML comment ``<!-- runbook-test: ... -->``
before a block names what the story does to Nexus first (``restart`` = kill -9 and start
again, ``delete-backup``, ``corrupt-backup``, ``drop-store-copy`` = delete the store's copy of
the backup): the runbook's own situations.

Issue 11, item 10: after any completed rotation, the fallback to ``root-key.backup.prev`` in
section 4 failed ("holds generation(s) [1] that this Nexus never created").
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nexus.core.ledger import BACKUP_COPY_STATE
from tests.harness import (
    PY,
    ROOT,
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    pilot,
    pilot_json,
    short_tmpdir,
    writer,
)

RUNBOOK = ROOT / "docs" / "runbooks" / "recovery.md"
NEW_PASSWORD = "violet anchor drizzle quantum ferry"  # noqa: S105 - a test fixture
MARKER = re.compile(r"<!--\s*runbook-test:\s*(.*?)\s*-->")
ACTIONS = {"restart", "delete-backup", "corrupt-backup", "drop-store-copy"}


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class Block:
    line: int
    actions: list[str]
    steps: list[Step]


def parse_runbook(text: str) -> list[Block]:
    blocks: list[Block] = []
    actions: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        marker = MARKER.fullmatch(stripped)
        if marker:
            actions = marker.group(1).split()
            assert set(actions) <= ACTIONS, (i + 1, actions)
        elif stripped == "```console":
            indent = len(lines[i]) - len(lines[i].lstrip())
            start = i + 1
            body: list[str] = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i][indent:])
                i += 1
            steps: list[Step] = []
            j = 0
            while j < len(body):
                assert body[j].startswith("$ "), (start + j, body[j])
                command = body[j][2:]
                j += 1
                output: list[str] = []
                while j < len(body) and not body[j].startswith("$ "):
                    output.append(body[j])
                    j += 1
                if command.strip() == "echo $?":
                    steps[-1].exit_code = int(output[0])
                else:
                    steps.append(Step(command, [o for o in output if o.strip()]))
            blocks.append(Block(start, actions, steps))
            actions = []
        elif stripped.startswith("```") and actions:
            raise AssertionError(f"line {i + 1}: a runbook-test marker before a non-console block")
        i += 1
    return blocks


def pattern(expected: str) -> list[re.Pattern[str]]:
    """One regex per ``...``-separated fragment: fingerprints, numbers may differ."""
    out = []
    for fragment in expected.split("..."):
        fragment = fragment.strip()
        if not fragment:
            continue
        regex = ""
        for token in re.split(r"([0-9a-f]{32}|\d+(?:\.\d+)?|\s+)", fragment):
            if not token:
                continue
            if re.fullmatch(r"[0-9a-f]{32}", token):
                regex += "[0-9a-f]{32}"
            elif re.fullmatch(r"\d+(?:\.\d+)?", token):
                regex += r"\d+(?:\.\d+)?"
            elif token.isspace():
                regex += r"\s+"
            else:
                regex += re.escape(token)
        out.append(re.compile(regex))
    return out


def test_the_runbook_parses_into_the_story_we_expect() -> None:
    blocks = parse_runbook(RUNBOOK.read_text())
    commands = [s.command for b in blocks for s in b.steps]
    assert any("root-key.backup.prev" in c for c in commands)
    assert any("--accept-old-password" in c for c in commands)
    assert sum(len(b.steps) for b in blocks) >= 20
    assert [b.actions for b in blocks if b.actions][:3] == [
        ["restart"], ["restart", "delete-backup"], ["restart", "delete-backup", "drop-store-copy"]]


@pytest.fixture()
def secure() -> Iterator[Path]:
    path = short_tmpdir("rb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1500)  # ~30 Pilot processes and 5 restarts: slow beside a CPU hog
def test_recovery_runbook_as_written_after_a_completed_rotation(
    agent: DevAgent, data_dir: Path, secure: Path
) -> None:
    (secure / "admin.pw").write_text(TEST_PASSWORD + "\n")
    (secure / "new-admin.pw").write_text(NEW_PASSWORD + "\n")
    su = agent.env("pilot")
    backup = data_dir / "root-key.backup"
    nexus = Nexus(data_dir, agent.env("nexus"))
    try:
        # The state the runbook describes: one completed rotation (generation 2 in use, 1
        # retired), a secret stored under it, an export made after the rotation.
        pilot_json(["init", "--password-file", str(secure / "admin.pw"), "--output", "json"],
                   su, nexus)
        assert pilot(["secret", "put", "app/db", "user=app", "pass=s3"], su, nexus).returncode == 0
        rotated = pilot(["rotate"], su, nexus)
        assert rotated.returncode == 0 and "completed" in rotated.stderr, rotated
        exported = pilot(["backup", "export", "--out", str(secure / "offsite.backup")], su, nexus)
        assert exported.returncode == 0 and "generations [2]" in exported.stdout, exported

        def substitute(text: str) -> str:
            return (text.replace("/var/lib/spike", str(data_dir))
                    .replace("/tmp/x.backup", str(secure / "x.backup"))  # noqa: S108 - the doc's path, mapped away
                    .replace("/secure", str(secure)))

        ran = 0
        for block in parse_runbook(RUNBOOK.read_text()):
            if "restart" in block.actions:
                nexus.kill()
            if "delete-backup" in block.actions:
                backup.unlink()
            if "corrupt-backup" in block.actions:
                backup.write_bytes(backup.read_bytes()[: len(backup.read_bytes()) // 3])
            if "drop-store-copy" in block.actions:
                with contextlib.closing(writer(data_dir)) as db:
                    db.execute("DELETE FROM state WHERE key = ?", (BACKUP_COPY_STATE,))
            if "restart" in block.actions:
                nexus = Nexus(data_dir, agent.env("nexus"))
            for step in block.steps:
                script = (f'spike() {{ "{PY}" -m pilot "$@"; }}\n'
                          f"export SPIKE_NEXUS_ADDR={nexus.address}\n{substitute(step.command)}")
                result = subprocess.run(["bash", "-c", script], env=su, capture_output=True,
                                        text=True, timeout=180)
                shown = result.stdout + result.stderr
                where = f"recovery.md line {block.line}: $ {step.command}\n{shown}"
                assert result.returncode == step.exit_code, where
                for line in step.expected:
                    for regex in pattern(substitute(line)):
                        assert regex.search(shown), f"{where}\nexpected: {line}"
                ran += 1
        assert ran >= 20
        # The story ends with Nexus unsealed, the secret readable and the backup sound.
        got = pilot_json(["secret", "get", "app/db", "--output", "json"], su, nexus)
        assert "s3" in str(got)
        assert pilot_json(["status", "--output", "json"], su, nexus)["backup"]["status"] == "ok"
    finally:
        nexus.stop()

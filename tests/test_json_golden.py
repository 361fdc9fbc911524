"""Golden test of every Pilot command's ``--output json``, byte for byte.

One Nexus goes through the whole lifecycle (init, secrets, policies, backup, password change,
rotation, restart and recover, audit verify) and every command's stdout is compared with
``tests/golden/pilot_json.txt``. Only values that differ from run to run are masked (times,
fingerprints and other hex digests, rotation ids, fractional numbers such as rates, the temporary
paths); names, key order, spacing, counts, versions and generations must match exactly. Streamed
commands (rotate, rotation watch) print one line per event, and which progress events a watcher
sees depends on speed, so there the final line must match exactly, every earlier line must have
the final line's shape (the same keys in the same order, the same values but for the progress
ones: phase, message, sequence, counts and the target generation, unknown before `new_key`),
and the phases must come in order.

Regenerate, after a deliberate change of output, with
``SPIKE_UPDATE_GOLDEN=1 pytest tests/test_json_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot, short_tmpdir

GOLDEN = Path(__file__).parent / "golden" / "pilot_json.txt"
NEW_PASSWORD = "violet anchor drizzle quantum ferry"  # noqa: S105 - a test fixture

_MASKS = [
    (re.compile(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?"'), '"<time>"'),
    (re.compile(r'"[0-9a-f]{16,}"'), '"<hex>"'),
    (re.compile(r'"sha256:[0-9a-f]+"'), '"<digest>"'),
    (re.compile(r"(?<![\w\"])-?\d+\.\d+(e-?\d+)?"), "<float>"),
]
# Integer or string values that depend on the clock or on chance, not on what was done.
_VOLATILE = re.compile(r'"(?P<key>rotation_id|id|eta_seconds|rate)": ("[0-9a-f]*"|-?\d+)')
# A node's name (hostname:data-dir by default) and address (the port as bound).
_NODE = re.compile(r'"(?P<key>node|address)": "[^"]*"')
_STREAMED = ("rotate", "rotation watch")


def mask(text: str, replacements: dict[str, str]) -> str:
    for literal, name in replacements.items():
        text = text.replace(json.dumps(literal)[1:-1], name)
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    text = _NODE.sub(lambda m: f'"{m.group("key")}": <node>', text)
    return _VOLATILE.sub(lambda m: f'"{m.group("key")}": <volatile>', text)


def fold(lines: list[str]) -> list[str]:
    """Consecutive identical lines (after masking) as one."""
    out: list[str] = []
    for line in lines:
        if not out or out[-1] != line:
            out.append(line)
    return out


@pytest.fixture()
def workdir() -> Iterator[Path]:
    path = short_tmpdir("gj-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pw(directory: Path, name: str, password: str) -> Path:
    path = directory / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def test_every_command_json_matches_the_golden_file(
    agent: DevAgent, data_dir: Path, workdir: Path
) -> None:
    pw = _pw(workdir, "pw", TEST_PASSWORD)
    new_pw = _pw(workdir, "new-pw", NEW_PASSWORD)
    export = workdir / "export.backup"
    imports = workdir / "import.jsonl"
    imports.write_text(
        '{"path": "bulk/a", "data": {"k": "1"}}\n{"path": "bulk/b", "data": {"k": "2"}}\n'
    )
    policies = workdir / "policies.json"
    policies.write_text(json.dumps([
        {"name": "readers", "spiffe_id_pattern": "spiffe://spike.internal/workload/.*",
         "path_pattern": "apps/.*", "permissions": ["read", "list"]},
    ]))
    replacements = {str(workdir): "<workdir>", str(data_dir): "<datadir>"}

    nexus = Nexus(data_dir, agent.env("nexus"))
    admin = agent.env("pilot")
    steps: list[tuple[str, list[str]]] = [
        ("status", ["status"]),
        ("init", ["init", "--password-file", str(pw)]),
        ("status", ["status"]),
        ("secret put", ["secret", "put", "apps/db", "user=app", "pass=hunter2"]),
        ("secret put", ["secret", "put", "apps/db", "user=app", "pass=hunter3", "--cas", "1"]),
        ("secret get", ["secret", "get", "apps/db"]),
        ("secret get", ["secret", "get", "apps/db", "--version", "1"]),
        ("secret get", ["secret", "get", "apps/db", "--field", "user"]),
        ("secret list", ["secret", "list"]),
        ("secret list", ["secret", "list", "apps/"]),
        ("secret metadata", ["secret", "metadata", "apps/db"]),
        ("secret delete", ["secret", "delete", "apps/db", "--version", "1"]),
        ("secret undelete", ["secret", "undelete", "apps/db", "--version", "1"]),
        ("secret destroy", ["secret", "destroy", "apps/db", "--version", "1"]),
        ("secret delete", ["secret", "delete", "apps/db"]),
        ("secret import", ["secret", "import", "--file", str(imports)]),
        ("policy put", ["policy", "put", "web", "--spiffe-id-pattern",
                        "spiffe://spike.internal/web", "--path-pattern", "apps/.*",
                        "--permissions", "read"]),
        ("policy get", ["policy", "get", "web"]),
        ("policy list", ["policy", "list"]),
        ("policy apply", ["policy", "apply", "--file", str(policies)]),
        ("policy delete", ["policy", "delete", "web"]),
        ("backup status", ["backup", "status"]),
        ("backup verify", ["backup", "verify", "--password-file", str(pw)]),
        ("backup export", ["backup", "export", "--out", str(export)]),
        ("password change", ["password", "change", "--password-file", str(pw),
                             "--new-password-file", str(new_pw)]),
        ("rotation schedule", ["rotation", "schedule"]),
        ("rotation schedule", ["rotation", "schedule", "--interval", "90d", "--window",
                               "01:00-05:00", "--max-encryptions", "1000000"]),
        ("rotation status", ["rotation", "status"]),
        ("rotate", ["rotate", "--reason", "golden"]),
        ("rotation status", ["rotation", "status"]),
        ("rotation watch", ["rotation", "watch"]),
        ("status", ["status"]),
            ]
    got: list[str] = []
    try:
        for label, args in steps:
            got += _run(label, args, admin, nexus, replacements)
        nexus.kill()
        nexus = Nexus(data_dir, agent.env("nexus"))
        for label, args in [
            ("status", ["status"]),
            ("recover", ["recover", "--password-file", str(new_pw)]),
            ("status", ["status"]),
            ("secret get", ["secret", "get", "bulk/a"]),
            ("audit verify", ["audit", "verify", str(data_dir / "audit.jsonl")]),
        ]:
            got += _run(label, args, admin, nexus, replacements)
        # A refused command prints nothing on stdout (its error goes to stderr).
        got += _run("secret get (missing)", ["secret", "get", "no/such"], admin, nexus,
                    replacements, expect=6)
    finally:
        nexus.stop()

    text = "".join(line + "\n" for line in got)
    if os.environ.get("SPIKE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    golden = sections(GOLDEN.read_text())
    mine = sections(text)
    assert [h for h, _ in mine] == [h for h, _ in golden], "the commands or exit codes changed"
    for (header, lines), (_, expected) in zip(mine, golden, strict=True):
        if header.split("  [")[0].removeprefix("$ spike ") in _STREAMED:
            assert lines and lines[-1] == expected[-1], (header, lines[-1:], expected[-1:])
            shape = _progress_shape(expected[-1])
            odd = [line for line in lines[:-1] if _progress_shape(line) != shape]
            assert not odd, (header, odd, shape)
            phases = [str(_event(line)["phase"]) for line in lines]
            assert phases == sorted(phases, key=_PHASE_ORDER.index), (header, phases)
        else:
            assert lines == expected, (header, lines, expected)


# A watcher sees some of a rotation's progress events, depending on speed: which ones is not
# part of the output's contract, their shape is.
_PROGRESS = re.compile(
    r'"(?P<key>phase|message|sequence|done|reencrypted|total|skipped|terminal|to_generation)": '
    r'("(?:[^"\\]|\\.)*"|-?\d+|true|false)'
)
_PHASE_ORDER = ["precheck", "new_key", "reencrypt", "validate", "finalize", "completed"]


def _event(line: str) -> dict[str, object]:
    """A masked event line read back as JSON (the masks stand for numbers)."""
    event: dict[str, object] = json.loads(line.replace("<float>", "0").replace("<volatile>", "0"))
    return event


def _progress_shape(line: str) -> str:
    """A rotation event line with its progress values masked: keys, order and the rest."""
    _event(line)  # one JSON object
    return _PROGRESS.sub(lambda m: f'"{m.group("key")}": <progress>', line)


def sections(text: str) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ spike "):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def _run(
    label: str, args: list[str], env: dict[str, str], nexus: Nexus,
    replacements: dict[str, str], expect: int = 0,
) -> list[str]:
    result = pilot(["--output", "json", *args], env, nexus)
    assert result.returncode == expect, (label, result.returncode, result.stderr)
    lines = [mask(line, replacements) for line in result.stdout.splitlines()]
    if label in _STREAMED:
        lines = fold(lines)
    return [f"$ spike {label}  [exit {result.returncode}]", *lines]

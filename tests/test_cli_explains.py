"""A CLI that explains itself: versions, help, exit codes and messages a new user meets first.

Each test names the point it holds: the exit code, the message and the JSON shape.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot.commands.secrets import parse_pairs
from tests.harness import (
    PY,
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    pilot,
    short_tmpdir,
    start_unsealed,
    wait_for,
)


@pytest.fixture(scope="module")
def unsealed(agent: DevAgent) -> Iterator[Nexus]:
    directory = short_tmpdir("nx-")
    running = start_unsealed(agent, directory)
    yield running
    running.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    out: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return out


def test_get_field_json_holds_only_that_key(agent: DevAgent, unsealed: Nexus) -> None:
    env = agent.env("pilot")
    put = pilot(["secret", "put", "cli/field", "user=app", "pass=hunter2"], env, unsealed)
    assert put.returncode == 0, put.stderr
    got = pilot(["secret", "get", "cli/field", "--field", "user", "--output", "json"], env,
                unsealed)
    assert got.returncode == 0, got.stderr
    assert got.stdout == '{"data": {"user": "app"}, "path": "cli/field", "version": 1}\n'
    raw = pilot(["secret", "get", "cli/field", "--field", "pass"], env, unsealed)
    assert (raw.returncode, raw.stdout) == (0, "hunter2")
    missing = pilot(["secret", "get", "cli/field", "--field", "nope", "--output", "json"], env,
                    unsealed)
    assert missing.returncode == 1
    assert _json(missing) == {"error": "cli/field version 1 has no key 'nope'", "exit_code": 1}


@pytest.mark.parametrize(("content", "value"), [
    ("s3cret\n", "s3cret"),        # echo s3cret > F
    ("s3cret", "s3cret"),          # printf s3cret > F
    ("s3cret\n\n", "s3cret\n"),    # exactly one newline goes
    ("line1\nline2\n", "line1\nline2"),
    ("\n", ""),
])
def test_at_file_value_loses_exactly_one_trailing_newline(
    tmp: Path, content: str, value: str
) -> None:
    (tmp / "v").write_text(content)
    assert parse_pairs([f"k=@{tmp / 'v'}"]) == {"k": value}


def test_put_help_documents_the_newline_rule() -> None:
    result = pilot(["secret", "put", "--help"], {})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "loses exactly one trailing newline" in text
    assert "example: spike secret put" in text


def test_invalid_policy_pattern_quotes_re2s_reason(agent: DevAgent, unsealed: Nexus) -> None:
    result = pilot(["policy", "put", "p1", "--spiffe-id-pattern", "spiffe://a/(b",
                    "--path-pattern", "x", "--permissions", "read", "--output", "json"],
                   agent.env("pilot"), unsealed)
    assert result.returncode == 2, result.stderr
    error = str(_json(result)["error"])
    assert "SPIFFE ID pattern is not a valid RE2 expression: missing ): spiffe://a/(b" in error
    result = pilot(["policy", "put", "p1", "--spiffe-id-pattern", "spiffe://a/b",
                    "--path-pattern", "(?=a)a", "--permissions", "read"],
                   agent.env("pilot"), unsealed)
    assert result.returncode == 2
    assert "path pattern is not a valid RE2 expression: invalid perl operator: (?=" in \
        result.stderr


def test_a_busy_listen_port_is_a_message_not_a_traceback(agent: DevAgent, nexus: Nexus,
                                                          tmp: Path) -> None:
    for flags in (["--listen", nexus.address],
                  ["--listen", "127.0.0.1:0", "--metrics-listen", nexus.address]):
        second = subprocess.run(
            [PY, "-m", "nexus", *flags, "--data-dir", str(tmp / "second"),
             "--insecure-test-kdf"],
            env=agent.env("nexus"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr
        last = second.stderr.splitlines()[-1]
        assert last.startswith("spike-nexus: cannot ")
        assert nexus.address in last
    assert "cannot listen on " + nexus.address + ": the address is in use" in \
        subprocess.run([PY, "-m", "nexus", "--listen", nexus.address, "--data-dir",
                        str(tmp / "third"), "--insecure-test-kdf"], env=agent.env("nexus"),
                       capture_output=True, text=True, timeout=120).stderr
    assert nexus.proc.poll() is None  # the first one still serves


def _pyproject_version() -> str:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    version: str = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    return version


@pytest.mark.parametrize(("module", "program"), [
    ("pilot", "spike"), ("nexus", "spike-nexus"), ("devagent", "spike-dev-agent")])
def test_version_of_each_program_is_pyprojects(module: str, program: str) -> None:
    result = subprocess.run([PY, "-m", module, "--version"], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{program} {_pyproject_version()}\n")


def test_status_version_is_the_same_one(agent: DevAgent, unsealed: Nexus) -> None:
    import nexus

    status = pilot(["status", "--output", "json"], agent.env("pilot"), unsealed)
    assert status.returncode == 0, status.stderr
    assert _json(status)["version"] == nexus.__version__ == _pyproject_version()


def test_already_initialized_and_unsealed_are_exit_10_in_json(agent: DevAgent,
                                                              unsealed: Nexus) -> None:
    import grpc

    env = agent.env("pilot")
    for args, words in ((["init", "--password-stdin"], "already initialized"),
                        (["recover", "--password-stdin"], "already unsealed")):
        result = pilot([*args, "--output", "json"], env, unsealed, stdin="x\n")
        assert result.returncode == 10, result.stderr
        answer = _json(result)
        assert answer["exit_code"] == 10 and words in str(answer["error"]), answer
        assert not any(c.name in result.stdout + result.stderr for c in grpc.StatusCode)


def test_a_fresh_nexus_neither_fails_nor_verifies_a_backup(agent: DevAgent, nexus: Nexus) -> None:
    env = agent.env("pilot")
    status = pilot(["status", "--output", "json"], env, nexus)
    assert status.returncode == 0, status.stderr
    data = _json(status)
    assert data["state"] == "uninitialized"
    assert data["backup"] == {
        "present": False, "path": str(nexus.data_dir / "root-key.backup"), "status": "missing",
        "detail": "not initialized yet: `spike init` makes the root key and writes the backup",
        "last_written": None, "last_verified": None, "generations": [], "kdf": ""}
    assert data["hardening"]["key_memory_locked"] is None  # type: ignore[index]
    text = pilot(["status"], env, nexus)
    assert text.returncode == 0, text.stderr
    assert "key memory locked: n/a (no key in memory)" in text.stdout
    assert re.search(r"backup verified\s+-\n", text.stdout), text.stdout
    # The periodic check (the first one runs at start) stays silent: no log, no audit.
    assert not [e for e in nexus.log_events() if "backup check" in str(e.get("event"))]
    audit = (nexus.data_dir / "audit.jsonl").read_text().splitlines()
    assert not [line for line in audit if '"backup.check"' in line]
    # Once a key exists, the line says whether its memory is locked.
    init = pilot(["init", "--password-stdin"], env, nexus, stdin=TEST_PASSWORD + "\n")
    assert init.returncode == 0, init.stderr
    after = _json(pilot(["status", "--output", "json"], env, nexus))
    assert isinstance(after["hardening"]["key_memory_locked"], bool)  # type: ignore[index]
    assert after["backup"]["last_verified"] is not None  # type: ignore[index]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_dev_agent_banner_on_stderr_and_stream_lines_only_at_debug(level: str) -> None:
    running = DevAgent(extra=["--log-level", level])
    try:
        env = running.env("pilot")
        env["SPIKE_NEXUS_ADDR"] = "127.0.0.1:1"  # nothing listens: the SVID fetch is enough
        pilot(["status"], env)
    finally:
        running.stop()
    assert running.proc.stdout is not None
    rest = running.proc.stdout.read()
    # The drain thread reads stderr to its end; the agent's last line is "stopped".
    assert wait_for(lambda: '"stopped"' in "".join(running._stderr))
    stderr = "".join(running._stderr)
    assert rest == ""  # stdout held "ready DIR" only (read by DevAgent)
    assert "DEVELOPMENT ONLY - never use spike-dev-agent in production" in stderr
    events = [json.loads(line).get("event") for line in stderr.splitlines()
              if line.startswith("{")]
    assert "svid_issued" in events
    assert ("stream_opened" in events) is (level == "debug"), events


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


def test_every_nexus_flag_has_help_with_its_default() -> None:
    import nexus.config

    parser = nexus.config.build_parser()
    helpless = [a.option_strings[0] for a in parser._actions
                if a.option_strings and a.help is not argparse.SUPPRESS
                and a.dest not in ("help", "version")
                and "(default: " not in parser._get_formatter()._expand_help(a)]
    assert not helpless, f"spike-nexus flags without help and default: {helpless}"
    text = subprocess.run([PY, "-m", "nexus", "--help"], capture_output=True, text=True,
                          timeout=60).stdout
    assert "--workers N           gRPC worker threads (calls served at once) (default:" in text
    assert "--max-connection-age-seconds SECONDS" in text
    assert "example: spike-nexus --listen" in text


def test_every_pilot_command_has_help_defaults_and_an_example() -> None:
    import pilot.__main__ as pilot_main

    parser = pilot_main.build_parser()
    commands = list(_leaves(parser))
    assert len(commands) >= 25
    for path, sub in commands:
        command = " ".join(path)
        assert sub.description, command
        assert sub.epilog and sub.epilog.startswith(f"example: spike {command}"), command
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest in ("help", "version"):
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text, (command, action.dest)
            if action.option_strings:
                assert "default" in text or "(required)" in text, (command, action.dest, text)
    text = subprocess.run([PY, "-m", "pilot", "rotate", "--help"], capture_output=True,
                          text=True, timeout=60).stdout
    assert "(default: 0)" in text and "example: spike rotate" in text


def test_validation_publishes_its_own_progress(tmp: Path) -> None:
    from nexus.core.rotation import RotationState
    from spike.states import RotationPhase
    from tests.harness import World

    world = World(tmp)
    try:
        world.fill()  # 80 records
        seen: list[RotationState] = []
        world.engine.add_listener(seen.append)
        world.engine.start(caller="test", batch_size=7)
        final = world.wait()
    finally:
        world.close()
    assert final.phase == RotationPhase.COMPLETED
    assert (final.done, final.total, final.reencrypted) == (80, 80, 80)
    validating = [s for s in seen if s.phase == RotationPhase.VALIDATE]
    # The phase's first event, then its result: validation checks the store in two
    # aggregate scans (each new ciphertext was checked in memory as it was written), so
    # it has no batches to count; done of total is every record in the store.
    assert [s.done for s in validating] == [0, 80], validating
    assert validating[-1].total == 80
    assert validating[-1].message == "validated 80 of 80 record(s)"
    sequences = [s.sequence for s in seen]
    assert sequences == sorted(set(sequences))


def test_the_reported_rate_counts_each_batch_from_its_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two batches of 100 records, each taking 0.5 s at 200 records/s: 200/s at both frames
    (the first frame of a rotation used to show up to twice its --max-rate)."""
    from nexus.core import pacing

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    meter = pacing.RateMeter()
    rates = []
    for _ in range(3):
        begun = now[0]
        now[0] += 0.5
        rates.append(meter.observe(100, begun))
    assert rates == [200.0, 200.0, 200.0]

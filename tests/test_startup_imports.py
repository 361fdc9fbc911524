"""Start-up stays lean: the modules the real programs have loaded by the time they exit (a
``sitecustomize`` on their path writes ``sys.modules`` out at exit; ``-X importtime`` would miss
what ``importlib.import_module`` loads). Never timed here; speed itself: tests/bench_startup.py.

- ``spike --help`` builds the whole parser and loads neither grpc nor anything heavy;
- ``spike status`` loads grpc, cryptography and py-spiffe (it must: the SVID comes from the
  Workload API through py-spiffe) but not rich, structlog, zxcvbn or importlib.metadata;
- a command line that names a command builds only that command's module's parser (checked
  against the full parser);
- ``spike-nexus`` on SQLite, started, asked for its status and stopped, loads none of
  rich, zxcvbn (loaded at the first password check), psycopg (PostgreSQL only),
  prometheus_client (metrics only), importlib.metadata (the version is a constant).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from pilot import __main__ as pilot_main
from spike.version import VERSION
from tests.harness import PY, ROOT, DevAgent, Nexus, base_env, pilot, short_tmpdir

SPIFFE = ("spiffe", "pyasn1", "pyasn1_modules", "jwt")  # py-spiffe and what it loads
ANY_TIME = ("rich", "zxcvbn", "importlib.metadata")


DUMP = """\
import atexit, os, sys


def _dump_modules():
    with open(os.environ["SPIKE_TEST_MODULES_OUT"], "w") as out:
        out.write("\\n".join(sorted(sys.modules)))


atexit.register(_dump_modules)
"""


class Loaded:
    """An environment whose Python processes write the modules they loaded to a file."""

    def __init__(self, directory: Path) -> None:
        (directory / "sitecustomize.py").write_text(DUMP)
        self.out = directory / "modules.txt"
        self.path = str(directory)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        return dict(env, PYTHONPATH=f"{self.path}:{ROOT}", SPIKE_TEST_MODULES_OUT=str(self.out))

    def modules(self) -> set[str]:
        return set(self.out.read_text().split())


@pytest.fixture()
def loaded() -> Iterator[Loaded]:
    directory = short_tmpdir("sl-")
    yield Loaded(directory)
    shutil.rmtree(directory, ignore_errors=True)


def found(modules: set[str], names: Iterable[str]) -> list[str]:
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


def test_help_loads_no_grpc_rich_protobuf_or_logging(loaded: Loaded) -> None:
    result = subprocess.run([PY, "-m", "pilot", "--help"], cwd=ROOT, capture_output=True,
                            text=True, env=loaded.env(base_env()), timeout=120)
    assert result.returncode == 0 and "rotate" in result.stdout
    modules = loaded.modules()
    assert "pilot.commands.rotation" in modules  # the check sees what --help loads
    heavy = ("grpc", "google.protobuf", "cryptography", "structlog", "nexus", *SPIFFE,
             *ANY_TIME)
    assert not found(modules, heavy)


def test_status_loads_grpc_and_py_spiffe_but_not_rich_or_zxcvbn(agent: DevAgent, nexus: Nexus,
                                                                loaded: Loaded) -> None:
    result = pilot(["status"], loaded.env(agent.env("pilot")), nexus)
    assert result.returncode == 0, result.stderr
    modules = loaded.modules()
    assert {"grpc", "spiffe"} <= modules
    assert not found(modules, ("structlog", "nexus", *ANY_TIME))


def test_nexus_on_sqlite_loads_only_what_it_needs(agent: DevAgent, data_dir: Path,
                                                  loaded: Loaded) -> None:
    running = Nexus(data_dir, loaded.env(agent.env("nexus")))
    try:
        status = pilot(["status"], agent.env("pilot"), running)
        assert status.returncode == 0, status.stderr
    finally:
        assert running.stop() == 0
    modules = loaded.modules()
    assert {"nexus.store.sqlite", "nexus.api.server", "structlog", "spiffe"} <= modules
    assert not found(modules, ("psycopg", "prometheus_client", *ANY_TIME))


def test_version_constant_is_pyprojects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION


def _top_level(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def test_command_owners_are_what_the_modules_register() -> None:
    """A command line naming a command builds only its module's parser: the same command."""
    everything = _top_level(pilot_main.build_parser())
    owners = pilot_main.COMMAND_OWNERS
    assert set(everything) == set(owners)
    for command, sub in everything.items():
        only = _top_level(pilot_main.build_parser(command))
        assert set(only) == {c for c, module in owners.items() if module == owners[command]}
        assert only[command].format_help() == sub.format_help()
        for name, nested in _top_level(sub).items():
            assert _top_level(only[command])[name].format_help() == nested.format_help()


@pytest.mark.parametrize(("argv", "command"), [
    (["status"], "status"),
    (["--output", "json", "secret", "get", "apps/db"], "secret"),
    (["--out", "json", "status"], "status"),  # argparse takes abbreviations
    (["--nexus=127.0.0.1:1", "rotate"], "rotate"),
    (["--nex", "status", "policy", "list"], "policy"),  # 'status' is --nexus's value
    (["--version"], None), (["--help"], None), ([], None), (["bogus"], None),
    (["--", "status"], None),
])
def test_named_command(argv: list[str], command: str | None) -> None:
    assert pilot_main.named_command(argv) == command

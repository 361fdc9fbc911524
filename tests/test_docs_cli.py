"""docs/cli.md names every program's commands and flags, so the reference cannot fall behind."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import devagent.__main__ as devagent_main
import nexus.config
import pilot.__main__ as pilot_main

CLI_MD = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def _named(flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", CLI_MD) is not None


PARSERS = {
    "spike": pilot_main.build_parser(),
    "spike-nexus": nexus.config.build_parser(),
    "spike-dev-agent": devagent_main.build_parser(),
}


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_every_flag_is_documented(program: str) -> None:
    missing = sorted({flag for _, p in _walk(PARSERS[program]) for flag in _flags(p)
                      if not _named(flag)})
    assert not missing, f"{program}: flags missing from docs/cli.md: {missing}"


def test_every_pilot_command_is_documented() -> None:
    commands = [" ".join(path) for path, p in _walk(PARSERS["spike"])
                if path and not any(isinstance(a, argparse._SubParsersAction)
                                    for a in p._actions)]
    assert len(commands) >= 25
    missing = [c for c in commands if not re.search("`" + re.escape(c) + r"[ `]", CLI_MD)]
    assert not missing, f"commands missing from docs/cli.md: {missing}"


def test_the_check_sees_an_undocumented_flag() -> None:
    assert _named("--data-dir")
    assert not _named("--no-such-flag")
    assert not _named("--data")  # a prefix of a documented flag does not count

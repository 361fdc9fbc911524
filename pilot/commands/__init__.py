"""Pilot's commands: one module per command group; each registers its subparsers."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    # What `add_subparsers()` returns, which each module's register() adds its commands to.
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

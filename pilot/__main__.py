"""spike: Pilot, the administrator's CLI for SPIKE Nexus.

Imports stay lazy so that `spike --help` answers fast: grpc and spiffe load
only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from pilot.errors import PilotError

COMMAND_MODULES = ("status", "keys", "secrets", "policies", "rotation", "audit")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from spike.version import VERSION

    # Accepted after any subcommand too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", choices=("text", "json"),
                        default=argparse.SUPPRESS,
                        help="text (default) or json: one JSON object per line on stdout")
    common.add_argument("--nexus", metavar="HOST:PORT", default=argparse.SUPPRESS,
                        help="Nexus address (default SPIKE_NEXUS_ADDR or 127.0.0.1:8553)")
    parser = argparse.ArgumentParser(
        prog="spike",
        description="Pilot: the administrator's CLI for SPIKE Nexus. Identity comes from "
        "SPIFFE_ENDPOINT_SOCKET (or SPIKE_SVID_CERT/SPIKE_SVID_KEY/SPIKE_TRUST_BUNDLE).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"spike {VERSION}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"pilot.commands.{name}")
        module.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if not hasattr(args, "output"):
        args.output = os.environ.get("SPIKE_OUTPUT", "text")
    if args.output not in ("text", "json"):
        print("spike: --output / SPIKE_OUTPUT must be text or json", file=sys.stderr)
        return 2
    if getattr(args, "offline", False):
        try:
            code: int = args.func(args, None)
            return code
        except PilotError as exc:
            return report(exc, args)
    from pilot.client import NexusClient

    client = NexusClient(getattr(args, "nexus", None))
    try:
        result: int = args.func(args, client)
        return result
    except PilotError as exc:
        return report(exc, args)
    except KeyboardInterrupt:
        print("spike: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `spike ... | head`: the reader left; not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        client.close()


def report(exc: PilotError, args: argparse.Namespace) -> int:
    """The error on stderr; with --output json also as a JSON line on stdout."""
    from pilot.output import render

    message = f"spike: {exc}"
    if exc.hint:
        message += f"\n  hint: {exc.hint}"
    print(message, file=sys.stderr)
    payload: dict[str, Any] = {"error": str(exc), "exit_code": exc.exit_code}
    if exc.hint:
        payload["hint"] = exc.hint
    render(args, payload)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

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
# The module that registers each top-level command (tests/test_startup_imports.py checks this
# against what the modules register): a command line that names one builds only its parser.
COMMAND_OWNERS = {
    "status": "status", "init": "keys", "recover": "keys", "backup": "keys", "password": "keys",
    "secret": "secrets", "policy": "policies", "rotate": "rotation", "rotation": "rotation",
    "audit": "audit",
}
_VALUED = ("--output", "--nexus")  # the top-level options that take a value


def named_command(argv: Sequence[str] | None) -> str | None:
    """The top-level command ``argv`` names (its first word that is neither an option nor a
    top-level option's value, abbreviations included), when it is a known one; else None."""
    args = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return None
        if word.startswith("-"):
            valued = (word.startswith("--") and "=" not in word and len(word) > 2
                      and any(option.startswith(word) for option in _VALUED))
            i += 2 if valued else 1
            continue
        return word if word in COMMAND_OWNERS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Pilot's parser: every command, or only the module of ``command`` (see named_command),
    which parses that command's line alike and starts faster."""
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
    names = (COMMAND_OWNERS[command],) if command in COMMAND_OWNERS else COMMAND_MODULES
    for name in names:
        module = importlib.import_module(f"pilot.commands.{name}")
        module.register(sub, common)
    explain(parser)
    return parser


# One example per command, shown at the end of its --help.
EXAMPLES = {
    "status": "spike status --output json",
    "init": "spike init --password-file admin-password.txt",
    "recover": "spike recover --password-file admin-password.txt",
    "backup status": "spike backup status",
    "backup verify": "spike backup verify --password-file admin-password.txt",
    "backup export": "spike backup export --out /safe/place/root-key.backup",
    "password change": "spike password change --password-file old.txt "
                       "--new-password-file new.txt",
    "secret put": "spike secret put apps/db user=app pass=@db-pass.txt",
    "secret get": "spike secret get apps/db --field pass",
    "secret list": "spike secret list apps/",
    "secret delete": "spike secret delete apps/db --version 3",
    "secret undelete": "spike secret undelete apps/db --version 3",
    "secret destroy": "spike secret destroy apps/db --version 1 --version 2",
    "secret metadata": "spike secret metadata apps/db",
    "secret import": "spike secret import --file secrets.jsonl",
    "policy put": "spike policy put db-readers --spiffe-id-pattern "
                  "'spiffe://spike\\.internal/workload/.*' --path-pattern 'apps/db(/.*)?' "
                  "--permissions read",
    "policy get": "spike policy get db-readers",
    "policy list": "spike policy list",
    "policy delete": "spike policy delete db-readers",
    "policy apply": "spike policy apply --file policies.json",
    "rotate": "spike rotate --max-rate 500 --reason 'yearly rotation'",
    "rotation status": "spike rotation status",
    "rotation watch": "spike rotation watch",
    "rotation abort": "spike rotation abort --reason 'peak traffic'",
    "rotation resume": "spike rotation resume",
    "rotation schedule": "spike rotation schedule --interval 90d --window 02:00-04:00",
    "audit verify": "spike audit verify spike-data/audit.jsonl",
}


def explain(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every command its one-line help as description and its example as epilog."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            command = " ".join((*path, name))
            sub.description = sub.description or helps.get(name)
            if command in EXAMPLES:
                sub.epilog = f"example: {EXAMPLES[command]}"
            explain(sub, (*path, name))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(named_command(argv))
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

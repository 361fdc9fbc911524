"""Reading passwords: a no-echo prompt (twice when creating), a file, or stdin — never argv.

Passwords live in bytearrays that the caller wipes after the RPC. The copy that
protobuf makes for the request is immutable and cannot be wiped: it lives only
for the duration of the call.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import TextIO

from pilot.errors import UsageError
from spike.memory import wipe_bytearray

MAX_PASSWORD_BYTES = 4096


def add_password_options(parser: argparse.ArgumentParser, *, new: bool = False) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--password-file", metavar="FILE", type=Path,
                       help="read the password from FILE (first line) (default: a no-echo "
                            "prompt)")
    group.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input (first line) (default: "
                            "off)")
    if new:
        parser.add_argument("--new-password-file", metavar="FILE", type=Path,
                            help="read the new password from FILE (first line); with "
                                 "--password-stdin the new password is the second line (default: a "
                                 "no-echo prompt, asked twice)")


def _first_line(data: bytearray) -> bytearray:
    end = data.find(b"\n")
    line = bytearray(data[: end if end >= 0 else len(data)])
    if line.endswith(b"\r"):
        line = line[:-1]
    wipe_bytearray(data)
    return line


def _read_file(path: Path) -> bytearray:
    try:
        with path.open("rb") as fh:
            data = bytearray(fh.read(MAX_PASSWORD_BYTES + 2))
    except OSError as exc:
        raise UsageError(f"cannot read password file {path}: {exc.strerror}") from None
    return _first_line(data)


def _read_stdin_line(stream: TextIO) -> bytearray:
    line = stream.buffer.readline(MAX_PASSWORD_BYTES + 2)
    return _first_line(bytearray(line))


def _prompt(label: str, confirm: bool) -> bytearray:
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to prompt for the password: use --password-file FILE or "
            "--password-stdin"
        )
    first = bytearray(getpass.getpass(f"{label}: ").encode("utf-8"))
    if confirm:
        second = bytearray(getpass.getpass(f"{label} (again): ").encode("utf-8"))
        same = first == second
        wipe_bytearray(second)
        if not same:
            wipe_bytearray(first)
            raise UsageError("the two passwords differ")
    return first


def read_password(args: argparse.Namespace, label: str = "Password",
                  *, confirm: bool = False) -> bytearray:
    if getattr(args, "password_file", None):
        pw = _read_file(args.password_file)
    elif getattr(args, "password_stdin", False):
        pw = _read_stdin_line(sys.stdin)
    else:
        pw = _prompt(label, confirm)
    if not pw:
        raise UsageError("the password is empty")
    return pw


def read_new_password(args: argparse.Namespace) -> bytearray:
    if getattr(args, "new_password_file", None):
        pw = _read_file(args.new_password_file)
    elif getattr(args, "password_stdin", False):
        pw = _read_stdin_line(sys.stdin)
    elif getattr(args, "password_file", None):
        raise UsageError("--password-file needs --new-password-file for the new password")
    else:
        pw = _prompt("New password", confirm=True)
    if not pw:
        raise UsageError("the new password is empty")
    return pw

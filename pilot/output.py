"""Rendering: JSON lines on stdout (--output json) or text; messages go to stderr.

Every command renders through :func:`render` (or asks :func:`json_mode` when it streams),
so the choice between the two outputs is made in one place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from spike.states import from_proto_name

if TYPE_CHECKING:
    from google.protobuf.message import Message

E = TypeVar("E", bound=StrEnum)
Data = Mapping[str, Any]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def json_mode(args: argparse.Namespace) -> bool:
    """True with --output json (one JSON object per line on stdout)."""
    return bool(args.output == "json")


def render(args: argparse.Namespace, data: Data | Callable[[], Data],
           text: str | Callable[[], object] | None = None) -> None:
    """``data`` as one JSON line with --output json; else ``text`` on stdout.

    ``data`` may be a callable (built only for JSON); ``text`` may be a callable that writes
    the text itself (streams, stderr, tables), or None when the text output is silent.
    """
    if json_mode(args):
        emit_json(data() if callable(data) else data)
    elif callable(text):
        text()
    elif text is not None:
        print(text)


def info(message: str) -> None:
    print(message, file=sys.stderr)


def iso_time(msg: Message, field: str) -> str | None:
    """A protobuf Timestamp field as ISO 8601 (UTC), or None when unset."""
    if not msg.HasField(field):
        return None
    from datetime import UTC, datetime

    nanos: int = getattr(msg, field).ToNanoseconds()
    return datetime.fromtimestamp(nanos / 1e9, UTC).isoformat()


def enum_word(enum: type[E], name: str, prefix: str) -> str:
    """The JSON word for a gRPC enum name (``ROTATION_PHASE_NEW_KEY`` -> ``new_key``): the
    member's value; a name this Pilot has no member for (UNSPECIFIED, a newer Nexus) is
    spelled the same way rather than refused."""
    try:
        return from_proto_name(enum, name, prefix).value
    except ValueError:
        return name.removeprefix(prefix).lower()


def text_table(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

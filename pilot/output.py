"""Rendering: JSON lines on stdout (--output json) or text; messages go to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    print(message, file=sys.stderr)


def iso_time(msg: Any, field: str) -> str | None:
    """A protobuf Timestamp field as ISO 8601 (UTC), or None when unset."""
    if not msg.HasField(field):
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(getattr(msg, field).ToNanoseconds() / 1e9, UTC).isoformat()


def text_table(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

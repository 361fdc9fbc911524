"""The audit trail's hash chain, shared by Nexus (writer) and Pilot (verifier).

Each audit line is a JSON object whose ``hash`` is
``sha256(prev_hash_hex + canonical_json(event_without_hash))`` and whose
``prev`` is the previous line's ``hash`` (``GENESIS`` for the first line). An
edited, deleted, inserted or reordered line breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev: str, event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(prev.encode() + canonical(body)).hexdigest()


# The routine event shape (no ``detail``): its canonical form is written out directly,
# which costs a fraction of json.dumps(sort_keys=True) on the hot path (every secret
# read). Keys in sorted order; a test checks it is byte-for-byte what canonical() gives.
_SIMPLE_KEYS = frozenset({"ts", "action", "caller", "target", "outcome"})
_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses


def _simple_body(prev: str, event: dict[str, Any]) -> bytes | None:
    ts = event.get("ts")
    if event.keys() != _SIMPLE_KEYS or type(ts) is not float or ts != ts or \
            ts in (float("inf"), float("-inf")):
        return None
    action, caller = event["action"], event["caller"]
    target, outcome = event["target"], event["outcome"]
    if not (type(action) is str and type(caller) is str and type(target) is str
            and type(outcome) is str and type(prev) is str):
        return None
    return (f'{{"action":{_str(action)},"caller":{_str(caller)},"outcome":{_str(outcome)},'
            f'"prev":{_str(prev)},"target":{_str(target)},"ts":{ts!r}}}').encode()


def sealed_line(prev: str, event: dict[str, Any]) -> tuple[bytes, str]:
    """The UTF-8 JSON line for ``event`` chained to ``prev``, and its hash, serialized once.

    The line is the canonical body with ``hash`` appended last; verification re-derives
    the canonical body from the parsed object, so key order in the line does not matter.
    """
    body = _simple_body(prev, event)
    if body is None:
        body = canonical(dict(event, prev=prev))
    digest = hashlib.sha256(prev.encode() + body).hexdigest()
    return b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n')), digest


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    lines: int
    error: str = ""
    bad_line: int = 0


def verify_lines(lines: Iterable[str]) -> ChainReport:
    """Check a whole audit file's lines; reports the first broken line (1-based)."""
    prev = GENESIS
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        count += 1
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return ChainReport(False, count, "not valid JSON", number)
        if not isinstance(event, dict) or "hash" not in event or "prev" not in event:
            return ChainReport(False, count, "missing hash or prev field", number)
        if event["prev"] != prev:
            return ChainReport(False, count, "chain broken: a line before was removed, "
                               "inserted or reordered", number)
        if chain_hash(prev, event) != event["hash"]:
            return ChainReport(False, count, "line content does not match its hash (edited)",
                               number)
        prev = event["hash"]
    return ChainReport(True, count)


def last_hash(lines: Iterable[str]) -> str:
    prev = GENESIS
    for line in lines:
        if line.strip():
            try:
                prev = json.loads(line)["hash"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return prev

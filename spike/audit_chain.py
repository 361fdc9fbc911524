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
from typing import IO, Any

GENESIS = "0" * 64
# No line Nexus writes comes near this (its fields are bounded); a longer one is damage.
MAX_LINE_BYTES = 1 << 20


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
    """``ok`` only if every line is a complete, chained event. ``torn_bytes`` > 0: the lines
    before ``bad_line`` are intact and the last line lacks its line break (a write cut short
    by a full disk or a crash), which Nexus moves aside when it next starts."""

    ok: bool
    lines: int
    error: str = ""
    bad_line: int = 0
    torn_bytes: int = 0
    # (line number, detail) of each audit.torn_tail event: a torn tail Nexus moved aside
    moved_tails: tuple[tuple[int, dict[str, Any]], ...] = ()


TORN_TAIL = "torn last line: no line break at the end (a write cut short)"


class _Chain:
    """Checks lines one at a time: :meth:`feed` answers the first failure, else ``None``."""

    def __init__(self) -> None:
        self.prev = GENESIS
        self.count = 0
        self.moved_tails: list[tuple[int, dict[str, Any]]] = []

    def feed(self, number: int, line: str) -> ChainReport | None:
        if not line.strip():
            return None
        self.count += 1
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: also a 4,301-digit integer
            return ChainReport(False, self.count, "not valid JSON", number)
        if not isinstance(event, dict) or "hash" not in event or "prev" not in event:
            return ChainReport(False, self.count, "missing hash or prev field", number)
        if event["prev"] != self.prev:
            return ChainReport(False, self.count, "chain broken: a line before was removed, "
                               "inserted or reordered", number)
        try:
            digest = chain_hash(self.prev, event)
        except ValueError:  # a lone surrogate (from a \ud800 escape) cannot be hashed
            digest = ""
        if digest != event["hash"]:
            return ChainReport(False, self.count, "line content does not match its hash (edited)",
                               number)
        self.prev = event["hash"]
        if event.get("action") == "audit.torn_tail" and isinstance(event.get("detail"), dict):
            self.moved_tails.append((number, event["detail"]))
        return None

    def report(self) -> ChainReport:
        return ChainReport(True, self.count, moved_tails=tuple(self.moved_tails))


def verify_lines(lines: Iterable[str]) -> ChainReport:
    """Check a whole audit file's lines; reports the first broken line (1-based)."""
    chain = _Chain()
    for number, line in enumerate(lines, start=1):
        failure = chain.feed(number, line)
        if failure is not None:
            return failure
    return chain.report()


def verify_file(fh: IO[bytes]) -> ChainReport:
    """Check an audit file opened in binary mode, in bounded memory.

    Unlike :func:`verify_lines` it tells a torn tail (the last line has no line break:
    ``torn_bytes``) from a broken chain, and names a line that is not UTF-8.
    """
    chain = _Chain()
    number = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return chain.report()
        number += 1
        if not raw.endswith(b"\n"):
            size = len(raw)
            if size > MAX_LINE_BYTES:  # read on, in bounded steps, to learn which it is
                while True:
                    more = fh.readline(MAX_LINE_BYTES)
                    size += len(more)
                    if not more or more.endswith(b"\n"):
                        break
                if more:
                    return ChainReport(False, chain.count + 1,
                                       f"line longer than {MAX_LINE_BYTES} bytes", number)
            return ChainReport(False, chain.count, TORN_TAIL, number, torn_bytes=size)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ChainReport(False, chain.count + 1, "not UTF-8 text", number)
        failure = chain.feed(number, line)
        if failure is not None:
            return failure


def event_hash(line: bytes) -> str:
    """The ``hash`` of one complete audit line; ``ValueError`` (with the reason) if the line
    is not a sealed event."""
    try:
        event = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    digest = event.get("hash") if isinstance(event, dict) else None
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError("no hash field")
    return digest

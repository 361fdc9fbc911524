"""spike audit verify FILE: check the audit trail's hash chain offline (no Nexus needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pilot.errors import PilotError, UsageError
from pilot.output import emit_json


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", parents=[parent], help="the audit trail")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = asub.add_parser("verify", parents=[parent],
                        help="detect edited, deleted, inserted or reordered audit lines")
    p.add_argument("file", type=Path)
    p.set_defaults(func=run_verify, offline=True)


class AuditChainBroken(PilotError):
    exit_code = 1


class AuditTailTorn(PilotError):
    """Every complete line is chained; the last one lacks its line break (a write cut short
    by a full disk or a crash). Nexus moves those bytes aside to FILE.torn at its next start."""

    exit_code = 12  # README exit codes: 11 is a failed rotation


def run_verify(args: argparse.Namespace, client: Any) -> int:
    from spike.audit_chain import verify_file

    try:
        with args.file.open("rb") as fh:
            report = verify_file(fh)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    torn = report.torn_bytes > 0
    moved_tails = _moved_tails(args.file, report.moved_tails)
    data: dict[str, Any] = {"file": str(args.file), "ok": report.ok, "lines": report.lines,
            "bad_line": report.bad_line or None, "error": report.error or None,
            "torn_tail": {"line": report.bad_line, "bytes": report.torn_bytes} if torn else None,
            "moved_tails": moved_tails}
    if torn:
        error: PilotError = AuditTailTorn(
            f"{args.file}: line {report.bad_line}: torn last line ({report.torn_bytes} bytes "
            f"with no line break: a write cut short by a full disk or a crash); the "
            f"{report.lines} event(s) before it are intact",
            hint=f"Nexus moves these bytes aside to {args.file}.torn when it next starts")
    else:
        error = AuditChainBroken(f"{args.file}: line {report.bad_line}: {report.error}")
    if args.output == "json":
        emit_json(data)
        if not report.ok:
            hint = f"\n  hint: {error.hint}" if error.hint else ""
            print(f"spike: {error}{hint}", file=sys.stderr)
        return 0 if report.ok else error.exit_code
    if not report.ok:
        raise error
    print(f"{args.file}: {report.lines} event(s), hash chain intact")
    for moved in moved_tails:
        print(f"  line {moved['line']}: a torn tail of {moved['bytes']} bytes was moved aside "
              f"to {moved['file']} ({moved['state']})")
    return 0


def _moved_tails(trail: Path, moved: Iterable[tuple[int, dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """Each torn tail Nexus moved aside (an audit.torn_tail event), and whether its file is
    still there with the bytes the event names (``matches``, ``differs`` or ``missing``)."""
    out = []
    for line, detail in moved:
        name = str(detail.get("moved_to", ""))
        state = "missing"
        path = trail.parent / name
        if name and "/" not in name and path.is_file():
            try:
                state = "matches" if _sha256(path) == detail.get("sha256") else "differs"
            except OSError:
                state = "unreadable"
        out.append({"line": line, "file": str(path), "bytes": detail.get("torn_bytes"),
                    "state": state})
    return out


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()

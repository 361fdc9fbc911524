"""spike audit verify FILE: check the audit trail's hash chain offline (no Nexus needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.errors import AuditChainBroken, AuditTailTorn, PilotError, UsageError
from pilot.output import json_mode, render

if TYPE_CHECKING:
    from pilot.commands import Subcommands


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", parents=[parent], help="the audit trail")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = asub.add_parser("verify", parents=[parent],
                        help="detect edited, deleted, inserted or reordered audit lines")
    p.add_argument("file", type=Path, help="the audit trail, e.g. DATA_DIR/audit.jsonl")
    p.set_defaults(func=run_verify, offline=True)


def run_verify(args: argparse.Namespace, client: None) -> int:
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
    if not report.ok and not json_mode(args):
        raise error
    lines = [f"{args.file}: {report.lines} event(s), hash chain intact"]
    lines += [f"  line {moved['line']}: a torn tail of {moved['bytes']} bytes was moved aside "
              f"to {moved['file']} ({moved['state']})" for moved in moved_tails]
    render(args, data, "\n".join(lines))
    if not report.ok:  # JSON output: the report is on stdout, the error on stderr
        hint = f"\n  hint: {error.hint}" if error.hint else ""
        print(f"spike: {error}{hint}", file=sys.stderr)
        return error.exit_code
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

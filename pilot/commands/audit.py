"""spike audit verify FILE: check the audit trail's hash chain offline (no Nexus needed)."""

from __future__ import annotations

import argparse
import sys
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


def run_verify(args: argparse.Namespace, client: Any) -> int:
    from spike.audit_chain import verify_lines

    try:
        with args.file.open(encoding="utf-8") as fh:
            report = verify_lines(fh)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AuditChainBroken(f"{args.file} is not UTF-8 text") from None
    data = {"file": str(args.file), "ok": report.ok, "lines": report.lines,
            "bad_line": report.bad_line or None, "error": report.error or None}
    if args.output == "json":
        emit_json(data)
        if not report.ok:
            print(f"spike: {args.file}: line {report.bad_line}: {report.error}", file=sys.stderr)
        return 0 if report.ok else AuditChainBroken.exit_code
    if not report.ok:
        raise AuditChainBroken(f"{args.file}: line {report.bad_line}: {report.error}")
    print(f"{args.file}: {report.lines} event(s), hash chain intact")
    return 0

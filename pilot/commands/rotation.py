"""spike rotate | rotation status|watch|abort|resume|schedule."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pilot.errors import EXIT_ROTATION_FAILED, PilotError, UsageError
from pilot.output import emit_json, enum_word, info, json_mode, render, text_table
from spike.states import ROTATION_PHASE_PREFIX, RotationPhase

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from pilot.commands import Subcommands
    from spike.v1.operator_pb2 import RotationEvent

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The same bound as Nexus (nexus.core.schedule.MAX_INTERVAL_DAYS): ten years.
MAX_INTERVAL_DAYS = 3650
MAX_INTERVAL = MAX_INTERVAL_DAYS * 86400
_MAX_DURATION_TEXT = 64


def parse_duration(text: str) -> int:
    """'90d', '12h', '1h30m', '0' -> seconds."""
    text = text.strip().lower()
    if len(text) > _MAX_DURATION_TEXT:
        raise UsageError(f"cannot read duration {text[:20]!r}...: too long")
    if text.isdigit():
        return int(text)
    pos, total = 0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise UsageError(f"cannot read duration {text!r}: use e.g. 90d, 12h, 30m, 1h30m")
    return total


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rotate", parents=[parent],
                       help="rotate the root key: re-encrypt every secret under a new key")
    p.add_argument("--emergency", action="store_true",
                   help="suspected compromise: full speed, ignore the maintenance window "
                        "(default: off)")
    p.add_argument("--detach", action="store_true",
                   help="start and return; do not watch (default: off, follow it to the end)")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="records re-encrypted per committed batch; 0 = Nexus's default, 500 "
                        "(2000 with --emergency) (default: %(default)s)")
    p.add_argument("--max-rate", type=int, default=0, metavar="N",
                   help="records per second; 0 = Nexus's default, 2000 (unlimited with "
                        "--emergency) (default: %(default)s)")
    p.add_argument("--reason", default="",
                   help="recorded in the audit trail (default: none)")
    p.set_defaults(func=run_rotate)

    rotation = sub.add_parser("rotation", parents=[parent], help="watch and steer rotations")
    rsub = rotation.add_subparsers(dest="rotation_command", metavar="COMMAND", required=True)
    p = rsub.add_parser("status", parents=[parent], help="the current or last rotation")
    p.set_defaults(func=run_status)
    p = rsub.add_parser("watch", parents=[parent], help="follow progress until it ends")
    p.set_defaults(func=run_watch)
    p = rsub.add_parser("abort", parents=[parent],
                        help="move re-encrypted records back and drop the new key")
    p.add_argument("--reason", default="", help="recorded in the audit trail (default: none)")
    p.add_argument("--detach", action="store_true",
                   help="do not watch the rollback (default: off, follow it)")
    p.set_defaults(func=run_abort)
    p = rsub.add_parser("resume", parents=[parent], help="resume a failed rotation")
    p.add_argument("--detach", action="store_true",
                   help="resume and return; do not watch (default: off, follow it)")
    p.set_defaults(func=run_resume)
    p = rsub.add_parser("schedule", parents=[parent], help="show or set the rotation schedule")
    p.add_argument("--interval", metavar="DURATION",
                   help="e.g. 90d, 12h, 1h30m; 0 turns it off (default: unchanged; shown "
                        "when no option is given)")
    p.add_argument("--window", metavar="HH:MM-HH:MM",
                   help="maintenance window in UTC; '' for any time (default: unchanged)")
    p.add_argument("--max-encryptions", type=int, metavar="N",
                   help="rotate once a key has encrypted N records; 0 turns it off "
                        "(default: unchanged)")
    p.set_defaults(func=run_schedule)


def event_dict(event: RotationEvent) -> dict[str, Any]:
    from spike.v1 import operator_pb2 as pb

    return {
        "rotation_id": event.rotation_id,
        "phase": enum_word(RotationPhase, pb.RotationPhase.Name(event.phase),
                           ROTATION_PHASE_PREFIX),
        "from_generation": event.from_generation,
        "to_generation": event.to_generation,
        "total": event.total,
        "done": event.done,
        "reencrypted": event.reencrypted,
        "skipped": event.skipped,
        "failed": event.failed,
        "rate": round(event.rate_per_second, 1),
        "eta_seconds": round(event.eta_seconds, 1),
        "emergency": event.emergency,
        "terminal": event.terminal,
        "message": event.message,
        "sequence": event.sequence,
        "failure_kind": event.failure_kind,
        "failed_in_phase": event.failed_in_phase,
        "failure_unsaved": event.failure_unsaved,
    }


def watch(args: argparse.Namespace, client: NexusClient, rotation_id: str = "") -> int:
    """Follow the rotation to its terminal event; exit 0 only when it completed."""
    stream = ResumingWatch(client, rotation_id)
    try:
        with client.errors():
            last = _follow_json(stream) if json_mode(args) else _draw(stream)
    except KeyboardInterrupt:
        stream.cancel()
        info("stopped watching; the rotation goes on in Nexus (`spike rotation watch`)")
        return 130
    if last is None:
        raise PilotError("no rotation events received")
    if last["phase"] == RotationPhase.IDLE:
        info("no rotation has run yet")
        return 1
    if not last["terminal"]:
        raise PilotError("the stream ended before the rotation did (Nexus stopping?); "
                         "run `spike rotation watch` again")
    if last["phase"] == RotationPhase.COMPLETED:
        info(f"rotation {last['rotation_id']} completed: generation {last['to_generation']} "
             f"active ({last['reencrypted']} re-encrypted, {last['skipped']} skipped)")
        return 0
    if last["phase"] == RotationPhase.FAILED:
        report_failure(last)
        return EXIT_ROTATION_FAILED
    info(f"rotation {last['rotation_id']} {last['phase']}: {last['message']}")
    return 1


class ResumingWatch:
    """WatchRotation's events, resumed when Nexus closes the stream's connection (by age).

    A cut stream is subscribed again to the same rotation; its first event is the snapshot of
    the rotation's state then, so nothing is lost, and events with a sequence at or below the
    last one seen are skipped, so nothing repeats. Other errors end the watch as before.
    """

    MAX_RESUMES_IN_A_ROW = 20

    def __init__(self, client: NexusClient, rotation_id: str) -> None:
        self._client = client
        self._rotation_id = rotation_id
        self._stream: Any = None

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()

    def __iter__(self) -> Iterator[RotationEvent]:
        import grpc

        from spike.client import transient
        from spike.v1 import operator_pb2 as pb

        last: int | None = None  # the sequence last yielded, once a stream was resumed
        seen: int | None = None
        failures = 0
        while True:
            self._stream = self._client.operator.WatchRotation(
                pb.WatchRotationRequest(rotation_id=self._rotation_id))
            try:
                for event in self._stream:
                    failures = 0
                    self._rotation_id = self._rotation_id or event.rotation_id
                    if last is not None and event.sequence <= last:
                        continue
                    last, seen = None, event.sequence
                    yield event
                return
            except grpc.RpcError as err:
                failures += 1
                if not transient(err) or failures > self.MAX_RESUMES_IN_A_ROW:
                    raise
                _debug(f"rotation watch: the stream was cut ({err.details()}); resuming")
            last = seen
            time.sleep(min(0.05 * 2 ** failures, 1.0))


def _debug(line: str) -> None:
    """A line on stderr when SPIKE_DEBUG is set (tests count the watch's resumes by it)."""
    if os.environ.get("SPIKE_DEBUG"):
        print(f"spike: debug: {line}", file=sys.stderr, flush=True)


def report_failure(event: dict[str, Any]) -> None:
    where = f" during {event['failed_in_phase']}" if event["failed_in_phase"] else ""
    kind = f" ({event['failure_kind']})" if event["failure_kind"] else ""
    info(f"spike: rotation {event['rotation_id']} FAILED{where}{kind}: {event['message']}")
    info(f"  both keys (generations {event['from_generation']} and "
         f"{event['to_generation'] or '-'}) are kept; every record stays readable; "
         f"{event['done']} of {event['total']} record(s) done")
    if event["failure_unsaved"]:
        info("  the store refused to save this failure too: Nexus keeps trying; until then "
             "only this Nexus process knows it")
    info("  fix the cause, then `spike rotation resume` (continues where it stopped) or "
         "`spike rotation abort`")


def _follow_json(stream: Iterable[RotationEvent]) -> dict[str, Any] | None:
    """One JSON line per event (keep-alive repeats left out); the last event."""
    last: dict[str, Any] | None = None
    for event in stream:
        if last is not None and event.sequence == last["sequence"]:
            continue  # a keep-alive repeat of the last event
        last = event_dict(event)
        emit_json(last)
    return last


def _draw(stream: Iterable[RotationEvent]) -> dict[str, Any] | None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    last: dict[str, Any] | None = None
    with Progress(
        TextColumn("[bold]{task.fields[phase]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f}/s"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[gens]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("rotation", total=None, phase="", rate=0.0, gens="")
        for event in stream:
            last = event_dict(event)
            progress.update(
                task,
                total=last["total"] or None,
                completed=last["done"],
                phase=last["phase"],
                rate=last["rate"],
                gens=f"gen {last['from_generation']}→{last['to_generation'] or '?'}",
            )
    return last


def run_rotate(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    resp = client.call(stub.StartRotation, pb.StartRotationRequest(
        emergency=args.emergency, batch_size=args.batch_size, max_rate=args.max_rate,
        reason=args.reason))
    if args.detach:
        data = {"rotation_id": resp.rotation_id, "from_generation": resp.from_generation,
                "to_generation": resp.to_generation, "detached": True}
        render(args, data, f"rotation {resp.rotation_id} started: generation "
                           f"{resp.from_generation} -> {resp.to_generation}; follow it with "
                           "`spike rotation watch`")
        return 0
    info(f"rotation {resp.rotation_id} started: generation {resp.from_generation} -> "
         f"{resp.to_generation}")
    return watch(args, client, resp.rotation_id)


def run_status(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    data = event_dict(client.call(stub.RotationStatus, pb.RotationStatusRequest()))
    render(args, data, lambda: print(text_table([(k, str(v)) for k, v in data.items()])))
    return 0


def run_watch(args: argparse.Namespace, client: NexusClient) -> int:
    return watch(args, client)


def run_abort(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    resp = client.call(stub.AbortRotation, pb.AbortRotationRequest(reason=args.reason))
    info(f"abort requested for rotation {resp.rotation_id}")
    if args.detach:
        render(args, {"rotation_id": resp.rotation_id, "abort_requested": True})
        return 0
    code = watch(args, client)
    return 0 if code == 1 else code  # a completed rollback ends in "aborted"


def run_resume(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    resp = client.call(stub.ResumeRotation, pb.ResumeRotationRequest())
    info(f"rotation {resp.rotation_id} resumed")
    if args.detach:
        return 0
    return watch(args, client)


def run_schedule(args: argparse.Namespace, client: NexusClient) -> int:
    from google.protobuf.duration_pb2 import Duration

    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    fields: list[str] = []
    schedule = pb.RotationSchedule()
    if args.interval is not None:
        interval = parse_duration(args.interval)
        if interval > MAX_INTERVAL:
            raise UsageError(f"--interval {args.interval} is too long: at most "
                             f"{MAX_INTERVAL_DAYS}d (10 years); 0 turns scheduled rotation off")
        schedule.interval.CopyFrom(Duration(seconds=interval))
        fields.append("interval")
    if args.window is not None:
        schedule.window = args.window
        fields.append("window")
    if args.max_encryptions is not None:
        schedule.max_encryptions = args.max_encryptions
        fields.append("max_encryptions")
    if fields:
        resp = client.call(stub.SetRotationSchedule, pb.SetRotationScheduleRequest(
            schedule=schedule, update_fields=fields))
    else:
        resp = client.call(stub.GetRotationSchedule, pb.GetRotationScheduleRequest())
    data: dict[str, Any] = {"interval_seconds": resp.interval.seconds, "window": resp.window,
                            "max_encryptions": resp.max_encryptions}
    if resp.problem:
        data["problem"] = resp.problem
    shown = resp.interval.seconds
    rows = [
        ("interval", f"{shown // 86400}d {shown % 86400 // 3600}h" if shown else "off"),
        ("window", resp.window or "any time (UTC)"),
        ("max encryptions", str(resp.max_encryptions)),
    ]
    if resp.problem:
        rows.append(("problem", resp.problem))
    render(args, data, text_table(rows))
    if resp.problem:
        info(f"warning: {resp.problem}")
    return 0

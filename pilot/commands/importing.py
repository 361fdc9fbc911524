"""`spike secret import`: JSON lines streamed to Nexus's Import RPC in batches.

Pilot parses each line (a malformed one is reported with its line number and sent nowhere),
packs the entries into batches of ``--batch-size`` (and at most ``BATCH_BYTES`` of lines),
and streams them; Nexus commits each batch in one durable commit and answers it, in order,
with its counts and failures (line numbers from the file). A reader thread takes the
answers as they come, so at most ``WINDOW`` batches are ever unanswered.

A stream lasts at most ``STREAM_SECONDS``, then Pilot closes it and opens another: a long
import never outlives the connection age Nexus enforces (its grace period lets a stream
that began before the age finish). When a stream is cut anyway (a connection closed, Nexus
restarting), Pilot opens a new one and sends the batches that were not answered again, and
goes on from there: with ``--skip-existing`` an entry that did commit before the cut is
skipped, so every line is written exactly once; without it such an entry gets a second,
identical version (as a repeated put would).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import grpc

from pilot.client import DEFAULT_TIMEOUT, translate
from pilot.errors import PilotError
from spike.client import Backoff, transient

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from spike.v1 import secrets_pb2 as pb

DEFAULT_BATCH = 1000
MAX_BATCH = 5000  # what Nexus takes in one request
BATCH_BYTES = 1 << 20  # of lines in one request: far below the 4 MiB message limit
MAX_LINE_BYTES = 3 << 20  # a longer line could not travel in one message
FLUSH_SECONDS = 1.0  # a batch waiting for lines (a slow stdin) goes out after this long
STREAM_SECONDS = 10.0
WINDOW = 4
SHAPE = 'expected {"path": str, "data": {str: str}}'


@dataclass
class Tally:
    imported: int = 0
    skipped: int = 0
    failed: int = 0
    lines: int = 0  # lines answered by Nexus or refused by Pilot so far
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def parse_line(line: str) -> tuple[str, dict[str, str]] | None:
    """``(path, data)`` of one line, or None when it is not the expected shape."""
    try:
        doc = json.loads(line)
        path, data = doc["path"], doc["data"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(path, str) or not isinstance(data, dict):
        return None
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return None
    return path, data


class Batches:
    """The requests of one file, built as they are asked for (a generator that several
    streams take from in turn)."""

    def __init__(self, lines: Iterable[str], batch_size: int, skip_existing: bool,
                 tally: Tally, say: Callable[[str], None]) -> None:
        from spike.v1 import secrets_pb2 as pb

        self._pb = pb
        self._lines = lines
        self._size = batch_size
        self._skip = skip_existing
        self._tally = tally
        self._say = say
        self.iterator = self._batches()

    def _refuse(self, message: str) -> None:
        with self._tally.lock:
            self._tally.failed += 1
            self._tally.lines += 1
        self._say(message)

    def _batches(self) -> Iterator[pb.ImportSecretsRequest]:
        request = self._pb.ImportSecretsRequest(skip_existing=self._skip)
        entries = request.entries
        size = started = 0.0
        for number, line in enumerate(self._lines, start=1):
            if entries and time.monotonic() - started > FLUSH_SECONDS:
                yield request
                request = self._pb.ImportSecretsRequest(skip_existing=self._skip)
                entries, size = request.entries, 0
            if len(line) > MAX_LINE_BYTES:
                self._refuse(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
                continue
            if not line.strip():
                continue
            parsed = parse_line(line)
            if parsed is None:
                self._refuse(f"line {number}: {SHAPE}")
                continue
            if not entries:
                started = time.monotonic()
            entries.add(line=number, path=parsed[0], data=parsed[1])
            size += len(line)
            if len(entries) >= self._size or size >= BATCH_BYTES:
                yield request
                request = self._pb.ImportSecretsRequest(skip_existing=self._skip)
                entries, size = request.entries, 0
        if entries:
            yield request


class Stream:
    """One Import call: the caller sends batches (at most WINDOW unanswered); a reader
    thread takes the answers, in order, and hands each with its batch to ``on_answer``."""

    def __init__(self, client: NexusClient,
                 on_answer: Callable[[pb.ImportSecretsRequest, pb.ImportSecretsResponse],
                                     None]) -> None:
        self.pending: deque[pb.ImportSecretsRequest] = deque()
        self.answered = 0
        self.error: grpc.RpcError | None = None
        self._on_answer = on_answer
        self._queue: queue.SimpleQueue[pb.ImportSecretsRequest | None] = queue.SimpleQueue()
        self._window = threading.Semaphore(WINDOW)
        # The deadline: the stream's own lifetime, then the usual wait for its answers.
        self._call = client.secrets.Import(self._requests(),
                                           timeout=STREAM_SECONDS + DEFAULT_TIMEOUT)
        self._reader = threading.Thread(target=self._read, name="import-answers",
                                        daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.ImportSecretsRequest]:
        while (request := self._queue.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for answer in self._call:
                request = self.pending.popleft()
                self.answered += 1
                self._window.release()
                self._on_answer(request, answer)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self._queue.put(None)  # the request generator ends, if it still waits
            self._window.release()  # the sender notices, if it waits

    def send(self, request: pb.ImportSecretsRequest) -> bool:
        """Queue one batch; False when the stream has failed (the batch is then pending,
        to be sent again)."""
        self.pending.append(request)
        while not self._window.acquire(timeout=0.5):
            if not self._reader.is_alive():
                break
        if self.error is not None or not self._reader.is_alive():
            return False
        self._queue.put(request)
        return True

    def close(self) -> grpc.RpcError | None:
        """End the stream and wait for its answers; the error that cut it, if any."""
        self._queue.put(None)
        self._reader.join()
        if self.error is None and self.pending:  # pragma: no cover - Nexus answers all
            raise PilotError("Nexus ended the import stream without answering every batch")
        return self.error


class Importer:
    """Streams the batches, one stream after another, and sends again what a cut stream
    left unanswered."""

    def __init__(self, client: NexusClient, batches: Batches, tally: Tally,
                 say: Callable[[str], None], progress: Callable[[], None]) -> None:
        self._client = client
        self._batches = batches.iterator
        self._tally = tally
        self._say = say
        self._progress = progress

    def _answer(self, request: pb.ImportSecretsRequest,
                answer: pb.ImportSecretsResponse) -> None:
        tally = self._tally
        with tally.lock:
            tally.imported += answer.imported
            tally.skipped += answer.skipped
            tally.failed += answer.failed
            tally.lines += len(request.entries)
            for failure in answer.failures:
                self._say(f"line {failure.line}: {failure.path}: {failure.message}")
            if answer.failures_not_listed:
                self._say(f"... and {answer.failures_not_listed} more failed line(s) of that "
                          "batch (not listed)")
        self._progress()

    def _one_stream(self, resend: list[pb.ImportSecretsRequest]) -> tuple[bool, Stream]:
        """Send what was left unanswered, then new batches for up to STREAM_SECONDS; True
        when the file is done."""
        stream = Stream(self._client, self._answer)
        began = time.monotonic()
        for index, request in enumerate(resend):
            if not stream.send(request):
                stream.pending.extend(resend[index + 1:])  # still to be sent
                return False, stream
        while time.monotonic() - began < STREAM_SECONDS:
            batch = next(self._batches, None)
            if batch is None:
                return True, stream
            if not stream.send(batch):
                break
        return False, stream

    def run(self) -> None:
        resend: list[pb.ImportSecretsRequest] = []
        backoff = Backoff(DEFAULT_TIMEOUT)
        while True:
            done, stream = self._one_stream(resend)
            error = stream.close()
            if error is None:
                if done:
                    return
                resend = []
                continue
            if not transient(error):
                raise translate(error, self._client.address)
            if stream.answered:
                backoff = Backoff(DEFAULT_TIMEOUT)  # it made progress: a fresh budget
            resend = list(stream.pending)
            if not backoff.wait():
                raise translate(error, self._client.address)


def count_lines(stream: IO[str]) -> int | None:
    """The number of lines of a regular file (for the progress bar), else None."""
    try:
        if not stream.seekable() or stream is sys.stdin:
            return None
        binary = stream.buffer  # type: ignore[attr-defined]
        start = binary.tell()
        total = sum(block.count(b"\n") for block in iter(lambda: binary.read(1 << 20), b""))
        binary.seek(start)
        return int(total)
    except (OSError, AttributeError, ValueError):
        return None


def run_with_progress(work: Callable[[Callable[[str], None], Callable[[], None]], None],
                      tally: Tally, total: int | None) -> None:
    """``work(say, progress)`` under a rich progress bar on stderr (redrawn a few times a
    second by rich's own thread; ``progress`` only records the count)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]import"), BarColumn(), MofNCompleteColumn(),
                  TaskProgressColumn(), TextColumn("{task.fields[failed]} failed"),
                  TimeRemainingColumn(), console=console, refresh_per_second=4,
                  transient=False) as bar:
        task = bar.add_task("import", total=total, failed=0)

        def progress() -> None:
            bar.update(task, completed=tally.lines, failed=tally.failed)

        def say(message: str) -> None:
            console.print(message, markup=False, highlight=False)

        work(say, progress)
        progress()


def import_file(client: NexusClient, stream: IO[str], *, batch_size: int,
                skip_existing: bool, bar: bool) -> Tally:
    """Import every line of ``stream``; the counts. Line errors are told as they come."""
    tally = Tally()

    def work(say: Callable[[str], None], progress: Callable[[], None]) -> None:
        batches = Batches(stream, batch_size, skip_existing, tally, say)
        Importer(client, batches, tally, say, progress).run()

    def plain(message: str) -> None:
        print(message, file=sys.stderr)

    if bar:
        run_with_progress(work, tally, count_lines(stream))
    else:
        work(plain, lambda: None)
    return tally


def summary(tally: Tally, skip_existing: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"imported": tally.imported, "failed": tally.failed}
    if skip_existing:
        data["skipped"] = tally.skipped
    return data

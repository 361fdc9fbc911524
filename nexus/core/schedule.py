"""Scheduled rotation: an interval since the active key was created (default 90 days),
an optional maintenance window (UTC), and an encryption-count trigger far below the
NIST SP 800-38D limit of 2^32 random-nonce encryptions per key.

The schedule lives in the store (state key ``rotation_schedule``), so it survives
restarts; the key's creation time is the one recorded at init/rotation. The
scheduler never starts a rotation while sealed, while one runs, or after one
failed (that needs an operator).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from nexus.core.counter import EncryptionCounter
from nexus.core.errors import InvalidInput, NexusError
from nexus.core.keymanager import KeyManager
from nexus.core.rotation import RotationEngine
from nexus.store.base import Store
from spike.states import RotationPhase

log = structlog.get_logger("nexus.schedule")

STATE_KEY = "rotation_schedule"
DEFAULT_INTERVAL = 90 * 86400.0
# 2^30: a quarter of the NIST limit, leaving room for a slow rotation to finish.
DEFAULT_MAX_ENCRYPTIONS = 2**30
NIST_LIMIT = 2**32
MIN_INTERVAL = 60.0
# Ten years (3650 days): far beyond any sensible key lifetime, and the key's creation time
# plus the interval stays a valid protobuf Timestamp (year 9999) and Duration.
MAX_INTERVAL_DAYS = 3650
MAX_INTERVAL = MAX_INTERVAL_DAYS * 86400.0

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True)
class Schedule:
    interval_seconds: float = DEFAULT_INTERVAL  # 0 = no scheduled rotation
    window: str = ""  # "HH:MM-HH:MM" UTC; "" = any time
    max_encryptions: int = DEFAULT_MAX_ENCRYPTIONS
    # Not stored: set by Scheduler.get when the stored schedule held a value out of range
    # (what was wrong, what applies instead).
    problem: str = field(default="", compare=False)

    def validate(self) -> Schedule:
        interval = self.interval_seconds
        if isinstance(interval, bool) or not isinstance(interval, int | float) \
                or not math.isfinite(interval):
            raise InvalidInput("the interval must be a number of seconds")
        if interval < 0:
            raise InvalidInput("the interval must be >= 0 (0 turns scheduled rotation off)")
        if interval and interval < MIN_INTERVAL:
            raise InvalidInput("the interval must be at least 1 minute")
        if interval > MAX_INTERVAL:
            raise InvalidInput(f"the interval must be at most {MAX_INTERVAL_DAYS} days "
                               "(10 years); 0 turns scheduled rotation off")
        if not isinstance(self.window, str):
            raise InvalidInput("the window must be HH:MM-HH:MM (UTC)")
        if self.window:
            parse_window(self.window)
        if isinstance(self.max_encryptions, bool) or not isinstance(self.max_encryptions, int) \
                or not 1 <= self.max_encryptions < NIST_LIMIT:
            raise InvalidInput(f"max encryptions must be in 1..{NIST_LIMIT - 1} (NIST SP "
                               "800-38D limit for random nonces)")
        return self

    def stored(self) -> dict[str, Any]:
        return {"interval_seconds": self.interval_seconds, "window": self.window,
                "max_encryptions": self.max_encryptions}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sanitize(doc: object) -> Schedule:
    """The stored schedule document as a valid Schedule: a value out of range (stored by
    an older release, or edited by hand) is replaced, and ``problem`` says so."""
    if not isinstance(doc, dict):
        return Schedule(problem="the stored schedule is unreadable: the default schedule "
                                "applies until one is set (`spike rotation schedule`)")
    defaults = Schedule()
    problems: list[str] = []
    values: dict[str, Any] = {}
    # field, what applies instead of an invalid stored value, how that reads
    fallbacks: tuple[tuple[str, object, str], ...] = (
        ("interval_seconds", 0.0, "scheduled rotation by age is off"),
        ("window", "", "any time of day"),
        ("max_encryptions", defaults.max_encryptions, str(defaults.max_encryptions)),
    )
    for name, fallback, instead in fallbacks:
        if name not in doc:
            continue
        value = doc[name]
        try:
            replace(defaults, **{name: value}).validate()
        except InvalidInput as exc:
            values[name] = fallback
            label = name.replace("_seconds", "").replace("_", " ")
            problems.append(f"stored {label} {_shown(value)} is invalid ({exc}); "
                            f"using {instead} until a valid one is set")
        else:
            values[name] = float(value) if name == "interval_seconds" else value
    schedule = replace(defaults, **values)
    if problems:
        schedule = replace(schedule, problem="; ".join(problems)
                           + " (`spike rotation schedule`)")
    return schedule


def parse_window(text: str) -> tuple[int, int]:
    match = _WINDOW.fullmatch(text.strip())
    if not match:
        raise InvalidInput(f"the window must be HH:MM-HH:MM (UTC), got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise InvalidInput("the window's start and end must differ")
    return start, end


def in_window(window: str, now: float) -> bool:
    if not window:
        return True
    start, end = parse_window(window)
    t = datetime.fromtimestamp(now, UTC)
    minute = t.hour * 60 + t.minute
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps past midnight


class Scheduler:
    def __init__(
        self,
        store: Store,
        keys: KeyManager,
        rotation: RotationEngine,
        counter: EncryptionCounter,
        *,
        clock: Callable[[], float] = time.time,
        check_every: float = 60.0,
    ) -> None:
        self._store = store
        self._keys = keys
        self._rotation = rotation
        self._counter = counter
        self._clock = clock
        self._check_every = check_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = ""

    # ------------------------------------------------------------------ schedule

    def get(self) -> Schedule:
        """The stored schedule; a stored value out of range is replaced by a safe one and
        reported in ``problem`` (never an exception: Status and Get must keep working)."""
        raw = self._store.get_state(STATE_KEY)
        if not raw:
            return Schedule()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        schedule = sanitize(doc)
        if schedule.problem and schedule.problem != self._reported:
            self._reported = schedule.problem  # once, not at every status call
            log.warning("stored rotation schedule is out of range", problem=schedule.problem)
        return schedule

    def set(self, **changes: object) -> Schedule:
        schedule = replace(self.get(), problem="", **changes).validate()  # type: ignore[arg-type]
        self._store.put_state(STATE_KEY, json.dumps(schedule.stored(), sort_keys=True))
        return schedule

    # ------------------------------------------------------------------ decisions

    def _active_created(self) -> tuple[int, float] | None:
        keyring = self._keys.keyring
        active = keyring.active_generation
        if active is None:
            return None
        info = self._keys.generations_recorded().get(active)
        return (active, info.created) if info else None

    def next_rotation(self, now: float | None = None) -> float | None:
        schedule = self.get()
        active = self._active_created()
        if active is None or not schedule.interval_seconds:
            return None
        return active[1] + schedule.interval_seconds

    def due(self, now: float | None = None) -> str | None:
        """The reason a rotation should start now, or None."""
        now = self._clock() if now is None else now
        if not self._keys.is_unsealed():
            return None
        current = self._rotation.current
        if self._rotation.running() or (current is not None and not current.terminal):
            return None
        if current is not None and current.phase == RotationPhase.FAILED:
            return None
        active = self._active_created()
        if active is None:
            return None
        generation, created = active
        schedule = self.get()
        count = self._counter.counts().get(generation, 0)
        # The rotation that created this generation re-encrypted every record under it;
        # those encryptions count toward the NIST budget but must not trigger the next
        # rotation, or a limit below the record count would rotate forever.
        if (current is not None and current.phase == RotationPhase.COMPLETED
                and current.to_generation == generation):
            count -= current.reencrypted + current.skipped
        if count >= schedule.max_encryptions:
            return f"generation {generation} reached {count} encryptions since rotation"
        if (schedule.interval_seconds and now - created >= schedule.interval_seconds
                and in_window(schedule.window, now)):
            return f"generation {generation} is older than the rotation interval"
        return None

    def tick(self, now: float | None = None) -> bool:
        reason = self.due(now)
        if reason is None:
            return False
        try:
            self._rotation.start(caller="(scheduler)", reason=reason)
        except NexusError as exc:
            log.warning("scheduled rotation not started", reason=reason, error=str(exc))
            return False
        log.info("scheduled rotation started", reason=reason)
        return True

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rotation-scheduler",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._check_every):
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")

    def stop(self) -> None:
        self._stop.set()

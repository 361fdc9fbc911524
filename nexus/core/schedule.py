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
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import structlog

from nexus.core.counter import EncryptionCounter
from nexus.core.errors import InvalidInput, NexusError
from nexus.core.keymanager import KeyManager
from nexus.core.rotation import COMPLETED, FAILED, RotationEngine
from nexus.store.base import Store

log = structlog.get_logger("nexus.schedule")

STATE_KEY = "rotation_schedule"
DEFAULT_INTERVAL = 90 * 86400.0
# 2^30: a quarter of the NIST limit, leaving room for a slow rotation to finish.
DEFAULT_MAX_ENCRYPTIONS = 2**30
NIST_LIMIT = 2**32

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True)
class Schedule:
    interval_seconds: float = DEFAULT_INTERVAL  # 0 = no scheduled rotation
    window: str = ""  # "HH:MM-HH:MM" UTC; "" = any time
    max_encryptions: int = DEFAULT_MAX_ENCRYPTIONS

    def validate(self) -> Schedule:
        if self.interval_seconds < 0:
            raise InvalidInput("the interval must be >= 0 (0 turns scheduled rotation off)")
        if self.interval_seconds and self.interval_seconds < 60:
            raise InvalidInput("the interval must be at least 1 minute")
        if self.window:
            parse_window(self.window)
        if not 1 <= self.max_encryptions < NIST_LIMIT:
            raise InvalidInput(f"max encryptions must be in 1..{NIST_LIMIT - 1} (NIST SP "
                               "800-38D limit for random nonces)")
        return self


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

    # ------------------------------------------------------------------ schedule

    def get(self) -> Schedule:
        raw = self._store.get_state(STATE_KEY)
        if not raw:
            return Schedule()
        doc = json.loads(raw)
        return Schedule(**{k: v for k, v in doc.items() if k in Schedule.__dataclass_fields__})

    def set(self, **changes: object) -> Schedule:
        schedule = replace(self.get(), **changes).validate()  # type: ignore[arg-type]
        self._store.put_state(STATE_KEY, json.dumps(asdict(schedule), sort_keys=True))
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
        if current is not None and current.phase == FAILED:
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
        if (current is not None and current.phase == COMPLETED
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

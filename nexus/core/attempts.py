"""The guard on password attempts: a growing backoff after each wrong password, served in the
wrong-password answer itself.

Every attempt runs under the key manager's lifecycle lock, one at a time, so that concurrent
guesses cannot slip past the backoff (nor run many 64 MiB KDFs). The delay is waited out after
the lock is released (:meth:`PasswordAttempts.wait_out`): the answer to a typo comes once the
next attempt would be accepted, while concurrent guesses meanwhile are refused
(:class:`errors.TooManyAttempts`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from nexus.core import errors

log = structlog.get_logger("nexus.keys")

# How long a wrong-password answer may be held back. Below Pilot's 120 s deadline for password
# calls.
WRONG_PASSWORD_DELAY_CAP = 30.0


class Backoff:
    """A growing delay after failed password attempts (per Nexus)."""

    def __init__(self, base: float, cap: float, clock: Callable[[], float]) -> None:
        self._base = base
        self._cap = cap
        self._clock = clock
        self.failures = 0
        self._not_before = 0.0

    def check(self) -> None:
        remaining = self._not_before - self._clock()
        if remaining > 0:
            raise errors.TooManyAttempts(remaining)

    def failed(self) -> float:
        self.failures += 1
        delay = float(min(self._cap, self._base * (2 ** (self.failures - 1))))
        self._not_before = self._clock() + delay
        return delay

    def remaining(self) -> float:
        return max(0.0, self._not_before - self._clock())

    def succeeded(self) -> None:
        self.failures = 0
        self._not_before = 0.0


class PasswordAttempts:
    """The backoff, the count of wrong passwords since start-up (a metric), and the held-back
    answer (woken at shutdown)."""

    def __init__(self, base: float, cap: float, *,
                 delay_cap: float = WRONG_PASSWORD_DELAY_CAP) -> None:
        self._backoff = Backoff(base, cap, time.monotonic)
        self._delay_cap = delay_cap
        self._closing = threading.Event()
        self.wrong_passwords = 0

    def check(self) -> None:
        """:class:`errors.TooManyAttempts` while the backoff is in force."""
        self._backoff.check()

    def failed(self) -> None:
        self.wrong_passwords += 1
        delay = self._backoff.failed()
        log.warning("wrong password", failures=self._backoff.failures, next_attempt_in=delay)

    def succeeded(self) -> None:
        self._backoff.succeeded()

    def wait_out(self) -> None:
        """Hold the wrong-password answer until the delay has passed (at most the cap)."""
        deadline = time.monotonic() + min(self._backoff.remaining(), self._delay_cap)
        while not self._closing.is_set():
            left = min(self._backoff.remaining(), deadline - time.monotonic())
            if left <= 0:
                return
            self._closing.wait(left)

    def close(self) -> None:
        """Answer every held-back attempt now (shutdown)."""
        self._closing.set()

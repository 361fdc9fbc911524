"""Process hardening for a process that holds root keys: no core dumps, not ptrace-dumpable.

Everything here is best effort and never raises: a failure is reported in the returned
:class:`HardeningReport` so the caller can turn it into a health warning and a metric.
"""

from __future__ import annotations

import ctypes
import mmap
import resource
from dataclasses import dataclass

from nexus.crypto.secret_buffer import SecretBuffer, _load_libc, live_buffer_counts

__all__ = [
    "HardeningReport",
    "SecretMemoryStatus",
    "core_dumps_disabled_now",
    "dumpable_off_now",
    "harden_process",
    "secret_memory_status",
]

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


@dataclass(frozen=True)
class HardeningReport:
    """What :func:`harden_process` managed to do."""

    core_dumps_disabled: bool
    """``RLIMIT_CORE`` is 0 (soft and hard)."""
    dumpable_off: bool
    """``prctl(PR_SET_DUMPABLE, 0)`` succeeded: no core dumps, no ptrace by same-uid processes."""
    mlock_available: bool
    """A probe page could be mlocked (``RLIMIT_MEMLOCK`` and privileges allow it)."""

    @property
    def fully_hardened(self) -> bool:
        """True when every measure succeeded."""
        return self.core_dumps_disabled and self.dumpable_off and self.mlock_available


@dataclass(frozen=True)
class SecretMemoryStatus:
    """How many live secret buffers exist and how many of them are mlocked."""

    live_buffers: int
    locked_buffers: int

    @property
    def all_locked(self) -> bool:
        """True when every live secret buffer is mlocked (vacuously true when there are none)."""
        return self.live_buffers == self.locked_buffers


def core_dumps_disabled_now() -> bool:
    """``RLIMIT_CORE`` is 0, soft and hard (someone with privileges may raise it with
    ``prlimit`` after start-up, so metrics ask again at every scrape). Never raises."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    except (OSError, ValueError):
        return False
    return soft == 0 and hard == 0


def _prctl(option: int) -> int | None:
    """``prctl(option, 0, 0, 0, 0)``, or None when libc or prctl is unavailable."""
    libc = _load_libc()
    prctl = getattr(libc, "prctl", None) if libc is not None else None
    if prctl is None:
        return None
    try:
        zero = ctypes.c_ulong(0)
        return int(prctl(option, zero, zero, zero, zero))
    except (OSError, AttributeError, ctypes.ArgumentError):
        return None


def dumpable_off_now() -> bool:
    """``prctl(PR_GET_DUMPABLE)`` is 0 (it resets on exec and setuid). Never raises."""
    return _prctl(_PR_GET_DUMPABLE) == 0


def _disable_core_dumps() -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        return False
    return core_dumps_disabled_now()


def _set_not_dumpable() -> bool:
    return _prctl(_PR_SET_DUMPABLE) == 0 and dumpable_off_now()


def _probe_mlock() -> bool:
    try:
        probe = SecretBuffer(mmap.PAGESIZE)
    except (OSError, ValueError):
        return False
    try:
        return probe.locked
    finally:
        probe.wipe()


def harden_process() -> HardeningReport:
    """Disable core dumps, make the process non-dumpable and probe ``mlock``. Never raises."""
    try:
        core = _disable_core_dumps()
    except Exception:
        core = False
    try:
        dumpable_off = _set_not_dumpable()
    except Exception:
        dumpable_off = False
    try:
        mlock_ok = _probe_mlock()
    except Exception:
        mlock_ok = False
    return HardeningReport(
        core_dumps_disabled=core, dumpable_off=dumpable_off, mlock_available=mlock_ok
    )


def secret_memory_status() -> SecretMemoryStatus:
    """Count live (un-wiped) secret buffers and how many are mlocked, for health and metrics."""
    live, locked = live_buffer_counts()
    return SecretMemoryStatus(live_buffers=live, locked_buffers=locked)

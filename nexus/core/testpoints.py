"""Named points where tests stop or hold Nexus from outside.

Every point is a member of :class:`Point`; its value is the name the variables below take.
A name that is not a point fails at start-up (``ConfigError`` when this module is imported),
so that a typo in a test shows as an error, not as a rotation that never stops where expected.

Pause (crash tests): when the environment variable ``SPIKE_NEXUS_TEST_PAUSE_AT`` names a
point, the thread that reaches it logs ``test pause point reached`` and blocks for good, so
that the test can kill the whole process with SIGKILL at exactly that moment.
``SPIKE_NEXUS_TEST_PAUSE_AFTER=N`` (default 1) pauses only on the Nth time the point is
reached in this process, e.g. the third batch of a rotation.

Gate (tests that must not depend on timing): when ``SPIKE_NEXUS_TEST_GATE_AT`` names a
point and ``SPIKE_NEXUS_TEST_GATE_DIR`` a directory, the thread that reaches the point for
the Nth time logs ``test gate reached`` (with ``count`` N) and waits until the test creates
the file ``DIR/N`` (let this passage through) or ``DIR/all`` (let every later one through
too). A test so steps a rotation batch by batch: nothing moves on while it looks.

Hooks (in-process tests): ``add_hook(fn)`` has ``fn(point)`` called, in the thread that
reaches it, at every point; ``remove_hook(fn)`` ends that. A test so acts between two
batches of a rotation whatever the machine's speed (the throttle's pause, used before, is
skipped when a batch is slow).

With the variables unset and no hook (always, in production) ``reached`` does nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path

import structlog

from spike.errors import ConfigError


class Point(StrEnum):
    """The test points, in the order a rotation reaches them. The values are what
    ``SPIKE_NEXUS_TEST_PAUSE_AT`` and ``SPIKE_NEXUS_TEST_GATE_AT`` name."""

    ROTATION_PRECHECK_DONE = "rotation_precheck_done"
    NEW_KEY_GENERATED = "new_key_generated"  # in memory, not yet in the backup
    BACKUP_UPDATED = "backup_updated"  # the new key is sealed into the backup
    ROTATION_NEW_KEY_DONE = "rotation_new_key_done"
    # After each batch of re-encryption (or rollback) is committed, before the next one.
    ROTATION_BETWEEN_BATCHES = "rotation_between_batches"
    ROTATION_VALIDATE = "rotation_validate"
    # Validation passed; the worker is about to decide between finalize and an abort.
    ROTATION_FINALIZE_GATE = "rotation_finalize_gate"
    ROTATION_VALIDATED = "rotation_validated"
    GENERATION_DROPPED_FROM_BACKUP = "generation_dropped_from_backup"
    ROTATION_FINALIZED = "rotation_finalized"
    ROTATION_ROLLED_BACK = "rotation_rolled_back"
    ROTATION_ABORT_DROPPED = "rotation_abort_dropped"
    # On a node following another node's rotation: a generation from the keyring of record
    # is about to be taken into memory.
    KEYRING_FOLLOW = "keyring_follow"


def _point(environ: Mapping[str, str], variable: str) -> Point | None:
    """The point ``variable`` names, None when unset; ConfigError for any other name."""
    name = environ.get(variable, "")
    if not name:
        return None
    try:
        return Point(name)
    except ValueError:
        known = ", ".join(p.value for p in Point)
        raise ConfigError(f"{variable}={name!r} is not a test point (known: {known})") from None


_PAUSE_AT = _point(os.environ, "SPIKE_NEXUS_TEST_PAUSE_AT")
_PAUSE_AFTER = max(int(os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AFTER", "1") or "1"), 1)
_GATE_AT = _point(os.environ, "SPIKE_NEXUS_TEST_GATE_AT")
_GATE_DIR = os.environ.get("SPIKE_NEXUS_TEST_GATE_DIR", "")
_log = structlog.get_logger("nexus.testpoints")
_forever = threading.Event()
_count_lock = threading.Lock()
_count = 0
_gate_count = 0
_GATE_POLL = 0.005
_hooks: tuple[Callable[[Point], None], ...] = ()


def add_hook(hook: Callable[[Point], None]) -> None:
    global _hooks
    with _count_lock:
        _hooks = (*_hooks, hook)


def remove_hook(hook: Callable[[Point], None]) -> None:
    global _hooks
    with _count_lock:
        _hooks = tuple(h for h in _hooks if h is not hook)


def reached(point: Point) -> None:
    for hook in _hooks:
        hook(point)
    if _GATE_AT is not None and point == _GATE_AT and _GATE_DIR:
        _gate()
    global _count
    if _PAUSE_AT is None or point != _PAUSE_AT:
        return
    with _count_lock:
        _count += 1
        hit = _count
    if hit != _PAUSE_AFTER:
        return
    _log.warning("test pause point reached", point=str(point), count=hit)
    _forever.wait()


def _gate() -> None:
    global _gate_count
    assert _GATE_AT is not None
    with _count_lock:
        _gate_count += 1
        hit = _gate_count
    gate = Path(_GATE_DIR)
    if (gate / "all").exists():
        return
    _log.warning("test gate reached", point=str(_GATE_AT), count=hit)
    while not ((gate / str(hit)).exists() or (gate / "all").exists()):
        time.sleep(_GATE_POLL)
    _log.info("test gate passed", point=str(_GATE_AT), count=hit)

"""Named points where tests stop or hold Nexus from outside.

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

Hooks (in-process tests): ``add_hook(fn)`` has ``fn(name)`` called, in the thread that
reaches it, at every point; ``remove_hook(fn)`` ends that. A test so acts between two
batches of a rotation whatever the machine's speed (the throttle's pause, used before, is
skipped when a batch is slow).

With the variables unset and no hook (always, in production) ``reached`` does nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

_PAUSE_AT = os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AT", "")
_PAUSE_AFTER = max(int(os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AFTER", "1") or "1"), 1)
_GATE_AT = os.environ.get("SPIKE_NEXUS_TEST_GATE_AT", "")
_GATE_DIR = os.environ.get("SPIKE_NEXUS_TEST_GATE_DIR", "")
_log = structlog.get_logger("nexus.testpoints")
_forever = threading.Event()
_count_lock = threading.Lock()
_count = 0
_gate_count = 0
_GATE_POLL = 0.005
_hooks: tuple[Callable[[str], None], ...] = ()


def add_hook(hook: Callable[[str], None]) -> None:
    global _hooks
    with _count_lock:
        _hooks = (*_hooks, hook)


def remove_hook(hook: Callable[[str], None]) -> None:
    global _hooks
    with _count_lock:
        _hooks = tuple(h for h in _hooks if h is not hook)


def reached(name: str) -> None:
    for hook in _hooks:
        hook(name)
    if _GATE_AT and name == _GATE_AT and _GATE_DIR:
        _gate()
    global _count
    if not _PAUSE_AT or name != _PAUSE_AT:
        return
    with _count_lock:
        _count += 1
        hit = _count
    if hit != _PAUSE_AFTER:
        return
    _log.warning("test pause point reached", point=name, count=hit)
    _forever.wait()


def _gate() -> None:
    global _gate_count
    with _count_lock:
        _gate_count += 1
        hit = _gate_count
    gate = Path(_GATE_DIR)
    if (gate / "all").exists():
        return
    _log.warning("test gate reached", point=_GATE_AT, count=hit)
    while not ((gate / str(hit)).exists() or (gate / "all").exists()):
        time.sleep(_GATE_POLL)
    _log.info("test gate passed", point=_GATE_AT, count=hit)

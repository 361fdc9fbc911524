"""Named points where crash tests stop Nexus from outside.

When the environment variable ``SPIKE_NEXUS_TEST_PAUSE_AT`` names a point, the
thread that reaches it logs ``test pause point reached`` and blocks, so that
the test can kill the whole process with SIGKILL at exactly that moment.
``SPIKE_NEXUS_TEST_PAUSE_AFTER=N`` (default 1) pauses only on the Nth time the
point is reached in this process, e.g. the third batch of a rotation. With the
variables unset (always, in production) ``reached`` does nothing.
"""

from __future__ import annotations

import os
import threading

import structlog

_PAUSE_AT = os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AT", "")
_PAUSE_AFTER = max(int(os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AFTER", "1") or "1"), 1)
_log = structlog.get_logger("nexus.testpoints")
_forever = threading.Event()
_count_lock = threading.Lock()
_count = 0


def reached(name: str) -> None:
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

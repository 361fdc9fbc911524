"""Named points where crash tests stop Nexus from outside.

When the environment variable ``SPIKE_NEXUS_TEST_PAUSE_AT`` names a point, the
thread that reaches it logs ``test pause point reached`` and blocks, so that
the test can kill the whole process with SIGKILL at exactly that moment. With
the variable unset (always, in production) ``reached`` does nothing.
"""

from __future__ import annotations

import os
import threading

import structlog

_PAUSE_AT = os.environ.get("SPIKE_NEXUS_TEST_PAUSE_AT", "")
_log = structlog.get_logger("nexus.testpoints")
_forever = threading.Event()


def reached(name: str) -> None:
    if _PAUSE_AT and name == _PAUSE_AT:
        _log.warning("test pause point reached", point=name)
        _forever.wait()

"""The one version of SPIKE's three programs: the installed distribution's, from pyproject.toml.

``spike --version``, ``spike-nexus --version``, ``spike-dev-agent --version`` and the
``version`` field of Nexus's status all read it from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

DISTRIBUTION = "spike-python"


def _installed() -> str:
    try:
        return _distribution_version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed()

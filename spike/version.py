"""The one version of SPIKE's three programs: pyproject.toml's ``[project] version``.

``spike --version``, ``spike-nexus --version``, ``spike-dev-agent --version`` and the
``version`` field of Nexus's status all read it from here. It is written here rather than read
from the installed distribution's metadata at run time (``importlib.metadata`` costs tens of
milliseconds at every start of every program); tests/test_cli_explains.py and
tests/test_startup_imports.py check that it is pyproject.toml's.
"""

from __future__ import annotations

DISTRIBUTION = "spike-python"

VERSION = "0.1.0"

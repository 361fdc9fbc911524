"""SPIKE Nexus, the secrets store server."""

# First: structlog is imported here without rich (see nexus/logs.py).
import nexus.logs  # noqa: F401
from spike.version import VERSION as __version__

__all__ = ["__version__"]

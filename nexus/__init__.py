"""SPIKE Nexus, the secrets store server."""

from spike.version import VERSION as __version__

__all__ = ["__version__"]

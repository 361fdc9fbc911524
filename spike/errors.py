"""Errors shared by Nexus and Pilot.

``SpikeError`` is the root. Messages are built in the exception and never
contain a password, a key or a secret value.
"""

from __future__ import annotations

# Trailing-metadata key with which Nexus tells Pilot precisely which error it returned
# (the status code alone is ambiguous; no client branches on message text).
ERROR_KIND_KEY = "spike-error-kind"


class SpikeError(Exception):
    """Root of every error this project raises on purpose."""


class IdentityError(SpikeError):
    """No usable SPIFFE identity (agent socket missing, not answering, bad PEM files)."""


class ConfigError(SpikeError):
    """Invalid configuration (flag, environment variable or config file)."""

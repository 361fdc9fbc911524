"""SPIKE's shared package; ``spike.Client`` is the client library for workloads.

``import spike`` stays cheap: the client (and grpc) load on first use of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spike.errors import SpikeError

if TYPE_CHECKING:
    from spike.client import (
        Client,
        ClientError,
        Conflict,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Sealed,
        SecretMetadata,
        Unavailable,
        Uninitialized,
        UntrustedServer,
        VersionInfo,
    )

__all__ = [
    "Client",
    "ClientError",
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Sealed",
    "SecretMetadata",
    "SpikeError",
    "Unavailable",
    "Uninitialized",
    "UntrustedServer",
    "VersionInfo",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from spike import client

        return getattr(client, name)
    raise AttributeError(f"module 'spike' has no attribute {name!r}")

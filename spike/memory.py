"""Wiping buffers that held a password or key material, for Nexus and Pilot alike.

Best effort: Python may hold older copies (an immutable ``bytes`` a library made, a
resized ``bytearray``'s old storage); what this guarantees is that the caller's own
mutable buffer is zeroed in place.
"""

from __future__ import annotations

import ctypes

__all__ = ["wipe_bytearray"]


def wipe_bytearray(data: bytearray) -> None:
    """Overwrite ``data`` with zeros in place (one ``memset``, whatever its length)."""
    if len(data):
        ctypes.memset((ctypes.c_char * len(data)).from_buffer(data), 0, len(data))

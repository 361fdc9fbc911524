"""Connection limits: what one Nexus process accepts, derived from its file descriptor limit.

A TCP connection costs a descriptor before it has shown a certificate. Three bounds keep
unauthenticated connections from starving real clients: the TLS handshake must finish
within ``handshake_timeout_seconds``; at most ``max_connections`` connections are open at
once (further ones are closed as soon as they are accepted); and the open-file limit is
raised to its hard limit at start, so the cap, not the kernel, is what a flood meets.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors kept for what is not a client connection: the store (SQLite, WAL, a
# PostgreSQL pool), the audit trail, the backup file and its temporaries, the Workload
# API stream, the metrics endpoint, Python's own.
RESERVED_DESCRIPTORS = 128
MIN_CONNECTIONS = 16


@dataclass(frozen=True)
class ConnectionLimits:
    open_files: int  # the soft RLIMIT_NOFILE after raising it
    max_connections: int
    handshake_timeout_ms: int
    max_concurrent_streams: int


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit; the cap below follows it
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(open_files: int, *, max_connections: int, handshake_timeout: float,
                      max_concurrent_streams: int) -> ConnectionLimits:
    derived = max(MIN_CONNECTIONS, open_files - RESERVED_DESCRIPTORS)
    cap = min(max_connections, derived) if max_connections > 0 else derived
    return ConnectionLimits(open_files, cap, int(handshake_timeout * 1000),
                            max_concurrent_streams)

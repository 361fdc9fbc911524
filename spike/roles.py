"""The SPIFFE IDs of SPIKE's own roles, one home for Nexus, Pilot and the dev agent.

Nexus serves as ``nexus_id``; Pilot calls as ``superuser_id`` (every operator RPC and the
policies) or ``recover_id`` (status, recover and the backup checks only). The IDs are part
of the interface: registration entries name them.
"""

from __future__ import annotations


def _role(td: str, path: str) -> str:
    return f"spiffe://{td}/spike/{path}"


def nexus_id(td: str) -> str:
    """Nexus itself (Pilot refuses a server with any other ID)."""
    return _role(td, "nexus")


def superuser_id(td: str) -> str:
    """Pilot with every right."""
    return _role(td, "pilot/role/superuser")


def recover_id(td: str) -> str:
    """Pilot allowed only to see the state and to unseal."""
    return _role(td, "pilot/role/recover")

"""The permissions a policy grants, one home for Nexus and Pilot.

The values are the words in policy files, JSON output and the stored policies; the gRPC enum
(``spike.v1.policies_pb2.Permission``) carries the same names upper-cased behind
``PERMISSION_PREFIX`` (convert with ``spike.states.proto_name`` / ``from_proto_name``).
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    LIST = "list"
    SUPER = "super"  # every action on the paths the policy matches


PERMISSIONS: tuple[str, ...] = tuple(p.value for p in Permission)
PERMISSION_PREFIX = "PERMISSION_"

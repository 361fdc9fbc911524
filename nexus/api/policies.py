"""Policies servicer: thin — decode, call core, encode. Every change is audited."""

from __future__ import annotations

from typing import Any

import grpc

from nexus.api.calls import rpc_call
from nexus.api.operator import timestamp
from nexus.audit import AuditLog
from nexus.core.policies import Policy, PolicyEngine
from spike.v1 import policies_pb2 as pb
from spike.v1 import policies_pb2_grpc as pb_grpc

_TO_PB = {
    "read": pb.PERMISSION_READ,
    "write": pb.PERMISSION_WRITE,
    "list": pb.PERMISSION_LIST,
    "super": pb.PERMISSION_SUPER,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


def to_message(policy: Policy) -> pb.Policy:
    return pb.Policy(
        name=policy.name,
        spiffe_id_pattern=policy.spiffe_id_pattern,
        path_pattern=policy.path_pattern,
        permissions=[_TO_PB[p] for p in sorted(policy.permissions)],
        created=timestamp(policy.created),
        updated=timestamp(policy.updated),
    )


def from_message(msg: pb.Policy) -> Policy:
    perms = frozenset(_FROM_PB.get(p, "unknown") for p in msg.permissions)
    return Policy(msg.name, msg.spiffe_id_pattern, msg.path_pattern, perms)


class PoliciesServicer(pb_grpc.PoliciesServicer):
    def __init__(self, policies: PolicyEngine, audit: AuditLog) -> None:
        self._policies = policies
        self._audit = audit

    def Put(self, request: pb.PutPolicyRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "policy.put", request.policy.name):
            return pb.PutPolicyResponse(
                policy=to_message(self._policies.put(from_message(request.policy))))

    def Get(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context):
            return to_message(self._policies.get(request.name))

    def List(self, request: pb.ListPoliciesRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context):
            return pb.ListPoliciesResponse(
                policies=[to_message(p) for p in self._policies.list()])

    def Delete(self, request: pb.DeletePolicyRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "policy.delete", request.name):
            self._policies.delete(request.name)
            return pb.DeletePolicyResponse()

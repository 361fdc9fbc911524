"""Policies servicer: thin — decode, call core, encode. Every change is audited."""

from __future__ import annotations

import grpc

from nexus.api.calls import rpc_call
from nexus.api.convert import policy_from_message, policy_message
from nexus.audit import AuditLog
from nexus.core.policies import PolicyEngine
from spike.v1 import policies_pb2 as pb
from spike.v1 import policies_pb2_grpc as pb_grpc


class PoliciesServicer(pb_grpc.PoliciesServicer):
    def __init__(self, policies: PolicyEngine, audit: AuditLog) -> None:
        self._policies = policies
        self._audit = audit

    def Put(self, request: pb.PutPolicyRequest,
            context: grpc.ServicerContext) -> pb.PutPolicyResponse:
        with rpc_call(context, self._audit, "policy.put", request.policy.name):
            return pb.PutPolicyResponse(
                policy=policy_message(self._policies.put(policy_from_message(request.policy))))

    def Get(self, request: pb.GetPolicyRequest, context: grpc.ServicerContext) -> pb.Policy:
        with rpc_call(context):
            return policy_message(self._policies.get(request.name))

    def List(self, request: pb.ListPoliciesRequest,
             context: grpc.ServicerContext) -> pb.ListPoliciesResponse:
        with rpc_call(context):
            return pb.ListPoliciesResponse(
                policies=[policy_message(p) for p in self._policies.list()])

    def Delete(self, request: pb.DeletePolicyRequest,
               context: grpc.ServicerContext) -> pb.DeletePolicyResponse:
        with rpc_call(context, self._audit, "policy.delete", request.name):
            self._policies.delete(request.name)
            return pb.DeletePolicyResponse()

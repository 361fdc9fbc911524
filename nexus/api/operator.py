"""Operator servicer: thin — decode, call core, encode."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nexus.api.authz import peer_spiffe_id
from nexus.api.errors import mapped_errors
from nexus.core.node import Node, StatusReport
from spike.v1 import operator_pb2 as pb
from spike.v1 import operator_pb2_grpc as pb_grpc

_STATES = {
    "uninitialized": pb.STATE_UNINITIALIZED,
    "sealed": pb.STATE_SEALED,
    "unsealed": pb.STATE_UNSEALED,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def status_message(report: StatusReport, caller: str) -> pb.StatusResponse:
    backup = report.backup
    return pb.StatusResponse(
        state=_STATES[report.state],
        root_key_generation=report.generation,
        root_key_fingerprint=report.fingerprint,
        root_key_created=timestamp(report.key_created),
        hardening=pb.Hardening(
            core_dumps_disabled=report.hardening.core_dumps_disabled,
            dumpable_off=report.hardening.dumpable_off,
            key_memory_locked=report.hardening.key_memory_locked,
        ),
        backup=pb.BackupInfo(
            present=backup.present,
            path=backup.path,
            status=backup.status,
            detail=backup.detail,
            last_written=timestamp(backup.last_written),
            last_verified=timestamp(backup.last_verified),
            generations=list(backup.generations),
            kdf=backup.kdf,
        ),
        version=report.version,
        caller_spiffe_id=caller,
        store=report.store,
        records_by_generation=report.records_by_generation,
    )


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        with mapped_errors(context):
            return status_message(self._node.status(), peer_spiffe_id(context))

"""Operator servicer: thin — decode, call core, encode."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nexus.api.calls import rpc_call
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


def backup_message(report: StatusReport) -> pb.BackupInfo:
    backup = report.backup
    return pb.BackupInfo(
        present=backup.present,
        path=backup.path,
        status=backup.status,
        detail=backup.detail,
        last_written=timestamp(backup.last_written),
        last_verified=timestamp(backup.last_verified),
        generations=list(backup.generations),
        kdf=backup.kdf,
    )


def status_message(report: StatusReport, caller: str) -> pb.StatusResponse:
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
        backup=backup_message(report),
        version=report.version,
        caller_spiffe_id=caller,
        store=report.store,
        records_by_generation=report.records_by_generation,
    )


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, node: Node) -> None:
        self._node = node
        self._audit = node.audit

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context) as caller:
            return status_message(self._node.status(), caller)

    def Init(self, request: pb.InitRequest, context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "init", durable=True):
            info = self._node.keys.init(request.password)
            return pb.InitResponse(
                root_key_generation=info.generation,
                root_key_fingerprint=info.fingerprint,
                backup_path=str(self._node.status().backup.path),
            )

    def Recover(self, request: pb.RecoverRequest, context: grpc.ServicerContext) -> Any:
        source = "exported copy" if request.backup else "server backup file"
        with rpc_call(context, self._audit, "recover", target=source, durable=True):
            keyring = self._node.keys.recover(request.password, request.backup)
            active = keyring.active_generation or 0
            return pb.RecoverResponse(
                root_key_generation=active,
                root_key_fingerprint=keyring.entry(active).fingerprint_hex,
                generations=list(keyring.generations),
            )

    def BackupStatus(self, request: pb.BackupStatusRequest,
                     context: grpc.ServicerContext) -> Any:
        with rpc_call(context):
            self._node.verify_backup_now()
            return pb.BackupStatusResponse(backup=backup_message(self._node.status()))

    def BackupVerify(self, request: pb.BackupVerifyRequest,
                     context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "backup.verify"):
            generations = self._node.keys.verify_with_password(request.password)
            return pb.BackupVerifyResponse(ok=True, generations=list(generations),
                                           detail="the password opens the backup and every "
                                                  "generation matches the keys in memory")

    def BackupExport(self, request: pb.BackupExportRequest,
                     context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "backup.export"):
            raw, generations = self._node.keys.export_backup()
            return pb.BackupExportResponse(backup=raw, generations=list(generations))

    def ChangePassword(self, request: pb.ChangePasswordRequest,
                       context: grpc.ServicerContext) -> Any:
        with rpc_call(context, self._audit, "password.change", durable=True):
            generations = self._node.keys.change_password(request.old_password,
                                                          request.new_password)
            return pb.ChangePasswordResponse(generations=list(generations))

"""Operator servicer: thin — decode, call core, encode."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from nexus.api.calls import rpc_call
from nexus.api.convert import backup_message, rotation_event, schedule_message, status_message
from nexus.core.errors import InvalidInput, NotFound
from nexus.core.node import Node
from spike.v1 import operator_pb2 as pb
from spike.v1 import operator_pb2_grpc as pb_grpc


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, node: Node) -> None:
        self._node = node
        self._audit = node.audit

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        with rpc_call(context) as caller:
            return status_message(self._node.status(), caller)

    def Init(self, request: pb.InitRequest, context: grpc.ServicerContext) -> pb.InitResponse:
        with rpc_call(context, self._audit, "init", durable=True):
            info = self._node.keys.init(request.password)
            return pb.InitResponse(
                root_key_generation=info.generation,
                root_key_fingerprint=info.fingerprint,
                backup_path=self._node.backup_path,
            )

    def Recover(self, request: pb.RecoverRequest,
                context: grpc.ServicerContext) -> pb.RecoverResponse:
        source = "exported copy" if request.backup else "server backup file"
        consent = {"accept_old_password": True} if request.accept_old_password else {}
        with rpc_call(context, self._audit, "recover", target=source, durable=True,
                      **consent) as caller:
            recovery = self._node.keys.recover_detailed(
                request.password, request.backup,
                accept_old_password=request.accept_old_password)
            keyring = recovery.keyring
            if recovery.old_password_accepted:
                self._audit.record("recover.old_password", caller=caller, target=source,
                                   outcome="accepted", durable=True,
                                   detail_text="recovered from a backup sealed under an "
                                               "earlier password, as the operator confirmed")
            if recovery.legacy_records_authenticated:
                self._audit.record("recover.legacy_records", caller=caller, target=source,
                                   outcome="authenticated", durable=True,
                                   detail_text="generation records from before authenticated "
                                               "records were vouched for by the password "
                                               "and tagged (--authenticate-legacy-records)")
            if recovery.from_store_copy:
                self._audit.record("recover.store_copy", caller=caller, target=source,
                                   outcome="restored", durable=True,
                                   detail_text="the backup file was missing or unreadable: "
                                               "the store's copy opened and was written back")
            if recovery.retired_generations:
                self._audit.record("recover.retired_generations", caller=caller,
                                   target=source, outcome="ignored",
                                   generations=list(recovery.retired_generations))
            active = keyring.active_generation or 0
            return pb.RecoverResponse(
                root_key_generation=active,
                root_key_fingerprint=keyring.entry(active).fingerprint_hex,
                generations=list(keyring.generations),
                old_password_accepted=recovery.old_password_accepted,
                retired_generations=list(recovery.retired_generations),
            )

    def BackupStatus(self, request: pb.BackupStatusRequest,
                     context: grpc.ServicerContext) -> pb.BackupStatusResponse:
        with rpc_call(context):
            self._node.verify_backup_now()
            return pb.BackupStatusResponse(backup=backup_message(self._node.status()))

    def BackupVerify(self, request: pb.BackupVerifyRequest,
                     context: grpc.ServicerContext) -> pb.BackupVerifyResponse:
        with rpc_call(context, self._audit, "backup.verify"):
            generations = self._node.keys.verify_with_password(request.password)
            return pb.BackupVerifyResponse(ok=True, generations=list(generations),
                                           detail="the password opens the backup and every "
                                                  "generation matches the keys in memory")

    def BackupExport(self, request: pb.BackupExportRequest,
                     context: grpc.ServicerContext) -> pb.BackupExportResponse:
        with rpc_call(context, self._audit, "backup.export"):
            raw, generations = self._node.keys.export_backup()
            return pb.BackupExportResponse(backup=raw, generations=list(generations))

    def ChangePassword(self, request: pb.ChangePasswordRequest,
                       context: grpc.ServicerContext) -> pb.ChangePasswordResponse:
        with rpc_call(context, self._audit, "password.change", durable=True):
            generations = self._node.keys.change_password(request.old_password,
                                                          request.new_password)
            return pb.ChangePasswordResponse(generations=list(generations))

    # ------------------------------------------------------------------ rotation

    def StartRotation(self, request: pb.StartRotationRequest,
                      context: grpc.ServicerContext) -> pb.StartRotationResponse:
        with rpc_call(context) as caller:
            upcoming = self._node.keys.next_generation()  # before the worker takes it
            state = self._node.rotation.start(
                caller=caller, emergency=request.emergency, batch_size=request.batch_size,
                max_rate=request.max_rate, reason=request.reason or "requested by operator")
            return pb.StartRotationResponse(rotation_id=state.rotation_id,
                                            from_generation=state.from_generation,
                                            to_generation=upcoming)

    def WatchRotation(self, request: pb.WatchRotationRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.RotationEvent]:
        with rpc_call(context):
            engine = self._node.rotation
            current = engine.current
            if request.rotation_id and (current is None
                                        or current.rotation_id != request.rotation_id):
                raise NotFound(f"no rotation {request.rotation_id}")
        if engine.current is None:
            yield rotation_event(None)
            return
        for state in engine.watch():
            if not context.is_active():
                return  # the watcher left; the rotation goes on
            yield rotation_event(state)

    def RotationStatus(self, request: pb.RotationStatusRequest,
                       context: grpc.ServicerContext) -> pb.RotationEvent:
        with rpc_call(context):
            return rotation_event(self._node.rotation.current)

    def AbortRotation(self, request: pb.AbortRotationRequest,
                      context: grpc.ServicerContext) -> pb.AbortRotationResponse:
        with rpc_call(context) as caller:
            state = self._node.rotation.abort(caller, request.reason)
            return pb.AbortRotationResponse(rotation_id=state.rotation_id)

    def ResumeRotation(self, request: pb.ResumeRotationRequest,
                       context: grpc.ServicerContext) -> pb.ResumeRotationResponse:
        with rpc_call(context) as caller:
            state = self._node.rotation.resume(caller)
            return pb.ResumeRotationResponse(rotation_id=state.rotation_id)

    def GetRotationSchedule(self, request: pb.GetRotationScheduleRequest,
                            context: grpc.ServicerContext) -> pb.RotationSchedule:
        with rpc_call(context):
            return schedule_message(self._node.scheduler.get())

    def SetRotationSchedule(self, request: pb.SetRotationScheduleRequest,
                            context: grpc.ServicerContext) -> pb.RotationSchedule:
        fields = set(request.update_fields)
        with rpc_call(context, self._audit, "rotation.schedule", ",".join(sorted(fields))):
            changes: dict[str, object] = {}
            unknown = fields - {"interval", "window", "max_encryptions"}
            if unknown:
                raise InvalidInput(f"unknown schedule fields: {sorted(unknown)}")
            if "interval" in fields:
                changes["interval_seconds"] = float(request.schedule.interval.ToSeconds())
            if "window" in fields:
                changes["window"] = request.schedule.window
            if "max_encryptions" in fields:
                changes["max_encryptions"] = int(request.schedule.max_encryptions)
            return schedule_message(self._node.scheduler.set(**changes))

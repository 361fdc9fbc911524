"""Operator servicer: thin — decode, call core, encode."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from nexus.api.calls import rpc_call
from nexus.core.errors import InvalidInput, NotFound
from nexus.core.node import Node, StatusReport
from nexus.core.rotation import RotationState
from nexus.core.schedule import Schedule
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
    nanos = int(seconds * 1e9)  # what Timestamp.FromNanoseconds takes, without its cost
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


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


_PHASES = {
    "idle": pb.ROTATION_PHASE_IDLE,
    "precheck": pb.ROTATION_PHASE_PRECHECK,
    "new_key": pb.ROTATION_PHASE_NEW_KEY,
    "reencrypt": pb.ROTATION_PHASE_REENCRYPT,
    "validate": pb.ROTATION_PHASE_VALIDATE,
    "finalize": pb.ROTATION_PHASE_FINALIZE,
    "rollback": pb.ROTATION_PHASE_ROLLBACK,
    "completed": pb.ROTATION_PHASE_COMPLETED,
    "failed": pb.ROTATION_PHASE_FAILED,
    "aborted": pb.ROTATION_PHASE_ABORTED,
}


def rotation_event(state: RotationState | None) -> pb.RotationEvent:
    if state is None:
        return pb.RotationEvent(phase=pb.ROTATION_PHASE_IDLE, terminal=True,
                                message="no rotation has run yet")
    return pb.RotationEvent(
        rotation_id=state.rotation_id,
        phase=_PHASES[state.phase],
        from_generation=state.from_generation,
        to_generation=state.to_generation,
        total=state.total,
        done=state.done,
        reencrypted=state.reencrypted,
        skipped=state.skipped,
        failed=state.failed,
        rate_per_second=state.rate,
        eta_seconds=state.eta,
        emergency=state.emergency,
        terminal=state.terminal,
        message=state.message,
        started=timestamp(state.started),
        updated=timestamp(state.updated),
        sequence=state.sequence,
        failure_kind=state.failure_kind,
        failed_in_phase=state.failed_in_phase,
        failure_unsaved=state.failure_unsaved,
    )


def schedule_message(schedule: Schedule) -> pb.RotationSchedule:
    return pb.RotationSchedule(
        interval=Duration(seconds=int(schedule.interval_seconds)),
        window=schedule.window,
        max_encryptions=schedule.max_encryptions,
        problem=schedule.problem,
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
        rotation=rotation_event(report.rotation) if report.rotation else None,
        schedule=schedule_message(report.schedule) if report.schedule else None,
        next_rotation=timestamp(report.next_rotation),
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

    # ------------------------------------------------------------------ rotation

    def StartRotation(self, request: pb.StartRotationRequest,
                      context: grpc.ServicerContext) -> Any:
        with rpc_call(context) as caller:
            upcoming = self._node.keys.next_generation()  # before the worker takes it
            state = self._node.rotation.start(
                caller=caller, emergency=request.emergency, batch_size=request.batch_size,
                max_rate=request.max_rate, reason=request.reason or "requested by operator")
            return pb.StartRotationResponse(rotation_id=state.rotation_id,
                                            from_generation=state.from_generation,
                                            to_generation=upcoming)

    def WatchRotation(self, request: pb.WatchRotationRequest,
                      context: grpc.ServicerContext) -> Any:
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
                       context: grpc.ServicerContext) -> Any:
        with rpc_call(context):
            return rotation_event(self._node.rotation.current)

    def AbortRotation(self, request: pb.AbortRotationRequest,
                      context: grpc.ServicerContext) -> Any:
        with rpc_call(context) as caller:
            state = self._node.rotation.abort(caller, request.reason)
            return pb.AbortRotationResponse(rotation_id=state.rotation_id)

    def ResumeRotation(self, request: pb.ResumeRotationRequest,
                       context: grpc.ServicerContext) -> Any:
        with rpc_call(context) as caller:
            state = self._node.rotation.resume(caller)
            return pb.ResumeRotationResponse(rotation_id=state.rotation_id)

    def GetRotationSchedule(self, request: pb.GetRotationScheduleRequest,
                            context: grpc.ServicerContext) -> Any:
        with rpc_call(context):
            return schedule_message(self._node.scheduler.get())

    def SetRotationSchedule(self, request: pb.SetRotationScheduleRequest,
                            context: grpc.ServicerContext) -> Any:
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

"""Conversions between the core's values and the gRPC messages, one home for every servicer.

The enum maps are derived from the state sets in :mod:`spike.states` and
:mod:`spike.permissions` (a member the proto lacks fails at import, not in a call).
"""

from __future__ import annotations

import math
import time

import structlog
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from nexus.core.cluster import NodeRecord
from nexus.core.node import StatusReport
from nexus.core.policies import Policy
from nexus.core.rotation import RotationState
from nexus.core.schedule import Schedule
from spike.permissions import PERMISSION_PREFIX, Permission
from spike.states import (
    ROTATION_PHASE_PREFIX,
    STATE_PREFIX,
    LifecycleState,
    RotationPhase,
    proto_name,
)
from spike.v1 import operator_pb2 as op_pb
from spike.v1 import policies_pb2 as pol_pb

_log = structlog.get_logger("nexus.secrets")

STATES: dict[str, op_pb.State.ValueType] = {
    state.value: op_pb.State.Value(proto_name(state, STATE_PREFIX)) for state in LifecycleState
}
PHASES: dict[str, op_pb.RotationPhase.ValueType] = {
    phase.value: op_pb.RotationPhase.Value(proto_name(phase, ROTATION_PHASE_PREFIX))
    for phase in RotationPhase
}
PERMISSIONS: dict[str, pol_pb.Permission.ValueType] = {
    p.value: pol_pb.Permission.Value(proto_name(p, PERMISSION_PREFIX)) for p in Permission
}
_PERMISSION_WORDS: dict[pol_pb.Permission.ValueType, str] = {
    v: k for k, v in PERMISSIONS.items()
}

_LAST_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z, the protobuf Timestamp maximum


def timestamp(seconds: float | None) -> Timestamp | None:
    if not seconds:
        return None
    nanos = int(seconds * 1e9)  # what Timestamp.FromNanoseconds takes, without its cost
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def stored_time(seconds: float | None, path: str) -> Timestamp | None:
    """A stored time as a Timestamp; a value no clock could have written (an edited
    database) is left out and logged rather than failing the call."""
    if seconds is None or (math.isfinite(seconds) and 0 <= seconds <= _LAST_TIMESTAMP):
        return timestamp(seconds)
    _log.error("stored timestamp out of range; left out", path=path)
    return None


# ---------------------------------------------------------------------- operator


def backup_message(report: StatusReport) -> op_pb.BackupInfo:
    backup = report.backup
    return op_pb.BackupInfo(
        present=backup.present,
        path=backup.path,
        status=backup.status,
        detail=backup.detail,
        last_written=timestamp(backup.last_written),
        last_verified=timestamp(backup.last_verified),
        generations=list(backup.generations),
        kdf=backup.kdf,
    )


def rotation_event(state: RotationState | None) -> op_pb.RotationEvent:
    if state is None:
        return op_pb.RotationEvent(phase=op_pb.ROTATION_PHASE_IDLE, terminal=True,
                                   message="no rotation has run yet")
    return op_pb.RotationEvent(
        rotation_id=state.rotation_id,
        phase=PHASES[state.phase],
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


def schedule_message(schedule: Schedule) -> op_pb.RotationSchedule:
    return op_pb.RotationSchedule(
        interval=Duration(seconds=int(schedule.interval_seconds)),
        window=schedule.window,
        max_encryptions=schedule.max_encryptions,
        problem=schedule.problem,
    )


def status_message(report: StatusReport, caller: str) -> op_pb.StatusResponse:
    now = time.time()
    return op_pb.StatusResponse(
        state=STATES[report.state],
        root_key_generation=report.generation,
        root_key_fingerprint=report.fingerprint,
        root_key_created=timestamp(report.key_created),
        hardening=op_pb.Hardening(
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
        nodes=[node_message(n, now, report.node_lease) for n in report.nodes],
        node=report.this_node,
    )


def node_message(node: NodeRecord, now: float, lease: float) -> op_pb.ClusterNode:
    return op_pb.ClusterNode(
        name=node.name, address=node.address, state=node.state,
        root_key_generation=node.generation, generations=list(node.generations),
        last_seen=timestamp(node.last_seen), live=node.live(now, lease), version=node.version)


# ---------------------------------------------------------------------- policies


def policy_message(policy: Policy) -> pol_pb.Policy:
    return pol_pb.Policy(
        name=policy.name,
        spiffe_id_pattern=policy.spiffe_id_pattern,
        path_pattern=policy.path_pattern,
        permissions=[PERMISSIONS[p] for p in sorted(policy.permissions)],
        created=timestamp(policy.created),
        updated=timestamp(policy.updated),
    )


def policy_from_message(msg: pol_pb.Policy) -> Policy:
    """An unknown permission number becomes the word "unknown", which the engine refuses."""
    perms = frozenset(_PERMISSION_WORDS.get(p, "unknown") for p in msg.permissions)
    return Policy(msg.name, msg.spiffe_id_pattern, msg.path_pattern, perms)

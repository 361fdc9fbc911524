"""Message helpers of the servicers (nexus/api/convert.py)."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from nexus.api.convert import timestamp


@pytest.mark.parametrize("seconds", [1795910569.718649344, 1700000000.000001, 0.5, 1e-9,
                                     -1.25, 2.5e9])
def test_timestamp_is_what_from_nanoseconds_gives(seconds: float) -> None:
    expected = Timestamp()
    expected.FromNanoseconds(int(seconds * 1e9))
    assert timestamp(seconds) == expected


@pytest.mark.parametrize("seconds", [None, 0, 0.0])
def test_no_time_is_no_timestamp(seconds: float | None) -> None:
    assert timestamp(seconds) is None


def test_enum_maps_cover_the_proto_enums_both_ways() -> None:
    """Each map is derived from its StrEnum; together they cover every proto value but 0."""
    from nexus.api import convert
    from spike.permissions import Permission
    from spike.states import LifecycleState, RotationPhase
    from spike.v1 import operator_pb2 as op_pb
    from spike.v1 import policies_pb2 as pol_pb

    for derived, words, proto in (
        (convert.STATES, LifecycleState, op_pb.State),
        (convert.PHASES, RotationPhase, op_pb.RotationPhase),
        (convert.PERMISSIONS, Permission, pol_pb.Permission),
    ):
        assert list(derived) == [member.value for member in words]
        assert sorted(derived.values()) == sorted(v for v in proto.values() if v != 0)


def test_pilot_reads_back_the_words_nexus_sends() -> None:
    from nexus.api import convert
    from pilot.output import enum_word
    from spike.permissions import PERMISSION_PREFIX, Permission
    from spike.states import ROTATION_PHASE_PREFIX, STATE_PREFIX, LifecycleState, RotationPhase
    from spike.v1 import operator_pb2 as op_pb
    from spike.v1 import policies_pb2 as pol_pb

    for phase in RotationPhase:
        name = op_pb.RotationPhase.Name(convert.PHASES[phase])
        assert enum_word(RotationPhase, name, ROTATION_PHASE_PREFIX) == phase.value
    for state in LifecycleState:
        name = op_pb.State.Name(convert.STATES[state])
        assert enum_word(LifecycleState, name, STATE_PREFIX) == state.value
    for permission in Permission:
        name = pol_pb.Permission.Name(convert.PERMISSIONS[permission])
        assert enum_word(Permission, name, PERMISSION_PREFIX) == permission.value
    # A name this Pilot has no member for is spelled, not refused (as before the enums).
    assert enum_word(RotationPhase, "ROTATION_PHASE_UNSPECIFIED",
                     ROTATION_PHASE_PREFIX) == "unspecified"


def test_policy_messages_round_trip() -> None:
    from nexus.api.convert import policy_from_message, policy_message
    from nexus.core.policies import Policy
    from spike.v1 import policies_pb2 as pol_pb

    policy = Policy("p", "spiffe://td/.*", "a/.*", frozenset({"read", "list", "super"}),
                    created=1700000000.5, updated=1700000001.0)
    msg = policy_message(policy)
    assert list(msg.permissions) == [pol_pb.PERMISSION_LIST, pol_pb.PERMISSION_READ,
                                     pol_pb.PERMISSION_SUPER]
    assert msg.created == timestamp(1700000000.5) and msg.updated == timestamp(1700000001.0)
    back = policy_from_message(msg)
    assert (back.name, back.spiffe_id_pattern, back.path_pattern, back.permissions) == (
        "p", "spiffe://td/.*", "a/.*", frozenset({"read", "list", "super"}))
    unknown = policy_from_message(pol_pb.Policy(name="q", permissions=[99]))  # type: ignore[list-item]
    assert unknown.permissions == frozenset({"unknown"})

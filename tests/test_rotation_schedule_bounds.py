"""The rotation schedule's interval is bounded (10 years), in Pilot and in Nexus, and a
schedule stored out of range (by an older release, or by hand) does not break Status, Get
or Set: it is reported and a safe value applies.

Real processes: a dev agent, a Nexus on SQLite, Pilot, and a bare grpcio client. Before the
bound, `--interval 3000000d` was stored, and then Status answered with a next rotation
beyond year 9999 that Pilot could not print (a traceback), and larger stored values made
Status and Get answer INTERNAL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from spike.identity import fetch_svid
from spike.tls import client_channel
from spike.v1 import operator_pb2, operator_pb2_grpc
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json

DAY = 86400
TEN_YEARS_DAYS = 3650
# pytest-timeout guards against a hang, not a slow machine: these start real processes
# and must pass under nice -n 19 beside a CPU hog.
pytestmark = pytest.mark.timeout(900)
RPC = 60  # seconds: generous for a loaded machine


@pytest.fixture()
def operator(agent: DevAgent, nexus: Nexus) -> Iterator[operator_pb2_grpc.OperatorStub]:
    pilot_json(["init", "--password-stdin", "--output", "json"], agent.env("pilot"), nexus,
               stdin=TEST_PASSWORD + "\n")
    channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                             "nexus.spike.internal")
    yield operator_pb2_grpc.OperatorStub(channel)
    channel.close()


def no_traceback(result: object) -> None:
    text = getattr(result, "stdout", "") + getattr(result, "stderr", "")
    assert "Traceback" not in text, text


def set_interval(operator: operator_pb2_grpc.OperatorStub, seconds: int) -> object:
    return operator.SetRotationSchedule(operator_pb2.SetRotationScheduleRequest(
        schedule=operator_pb2.RotationSchedule(interval=Duration(seconds=seconds)),
        update_fields=["interval"]), timeout=RPC)


def test_pilot_refuses_an_interval_beyond_ten_years(agent: DevAgent, nexus: Nexus,
                                                     operator: object) -> None:
    env = agent.env("pilot")
    for text in ("3000000d", f"{TEN_YEARS_DAYS + 1}d", "9" * 30 + "d", "9" * 5000):
        result = pilot(["rotation", "schedule", "--interval", text], env, nexus)
        no_traceback(result)
        assert result.returncode == 2, (text[:20], result.stdout, result.stderr)
        assert "interval" in result.stderr or "duration" in result.stderr, result.stderr
    # The bound itself is accepted; nothing out of range was stored meanwhile.
    ok = pilot_json(["rotation", "schedule", "--interval", f"{TEN_YEARS_DAYS}d",
                     "--output", "json"], env, nexus)
    assert ok["interval_seconds"] == TEN_YEARS_DAYS * DAY
    status = pilot(["status"], env, nexus)
    no_traceback(status)
    assert status.returncode == 0, status.stderr


OUT_OF_RANGE = [3000000 * DAY, (TEN_YEARS_DAYS + 1) * DAY, 10**12, 2**63 - 1, -DAY, 30]


def test_nexus_answers_invalid_argument_to_a_bare_client(
        operator: operator_pb2_grpc.OperatorStub) -> None:
    for seconds in OUT_OF_RANGE:
        with pytest.raises(grpc.RpcError) as caught:
            set_interval(operator, seconds)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, \
            (seconds, caught.value.details())
        assert "interval" in (caught.value.details() or "")
        # Nothing was stored: Status, Get still answer, with the default interval.
        schedule = operator.GetRotationSchedule(operator_pb2.GetRotationScheduleRequest(),
                                                timeout=RPC)
        assert schedule.interval.seconds == 90 * DAY and not schedule.problem
        status = operator.Status(operator_pb2.StatusRequest(), timeout=RPC)
        assert status.HasField("next_rotation")


def write_stored_schedule(data_dir: Path, raw: str) -> None:
    """What an older release (or a hand edit) left in the database."""
    db = sqlite3.connect(data_dir / "spike.db", timeout=30)
    try:
        with db:
            db.execute("INSERT INTO state (key, value) VALUES ('rotation_schedule', ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (raw,))
    finally:
        db.close()


STORED = {
    "3000000d": json.dumps({"interval_seconds": 3000000.0 * DAY, "window": "",
                            "max_encryptions": 2**30}),
    "1e300": json.dumps({"interval_seconds": 1e300, "window": "", "max_encryptions": 2**30}),
    "infinity": '{"interval_seconds": Infinity, "window": "", "max_encryptions": 1073741824}',
    "nan": '{"interval_seconds": NaN, "window": "", "max_encryptions": 1073741824}',
    "negative": json.dumps({"interval_seconds": -5.0, "window": "", "max_encryptions": 2**30}),
    "text": json.dumps({"interval_seconds": "90d", "window": "", "max_encryptions": 2**30}),
    "window": json.dumps({"interval_seconds": 7776000.0, "window": "25:99-xx",
                          "max_encryptions": 2**30}),
    "encryptions": json.dumps({"interval_seconds": 7776000.0, "window": "",
                               "max_encryptions": 2**70}),
    "garbage": "{not json",
}


PILOT_CASES = ("3000000d", "garbage", "infinity")


def check_set_clears(operator: operator_pb2_grpc.OperatorStub, problem: str) -> None:
    assert problem
    after = operator.SetRotationSchedule(operator_pb2.SetRotationScheduleRequest(
        schedule=operator_pb2.RotationSchedule(interval=Duration(seconds=30 * DAY)),
        update_fields=["interval"]), timeout=RPC)
    assert after.interval.seconds == 30 * DAY and not after.problem, after


def test_a_stored_out_of_range_schedule_is_reported_not_fatal(
        agent: DevAgent, nexus: Nexus, data_dir: Path,
        operator: operator_pb2_grpc.OperatorStub) -> None:
    for case in sorted(STORED):
        write_stored_schedule(data_dir, STORED[case])
        env = agent.env("pilot")

        schedule = operator.GetRotationSchedule(operator_pb2.GetRotationScheduleRequest(),
                                                timeout=RPC)
        assert schedule.problem, (case, schedule)
        assert 0 <= schedule.interval.seconds <= TEN_YEARS_DAYS * DAY
        status = operator.Status(operator_pb2.StatusRequest(), timeout=RPC)
        assert status.schedule.problem == schedule.problem
        rotation_status = operator.RotationStatus(operator_pb2.RotationStatusRequest(), timeout=RPC)
        assert rotation_status is not None

        if case not in PILOT_CASES:  # Pilot renders every problem alike: a few suffice
            check_set_clears(operator, schedule.problem)
            continue
        shown = pilot(["rotation", "schedule"], env, nexus)
        no_traceback(shown)
        assert shown.returncode == 0, shown.stderr
        assert "problem" in shown.stdout and "warning" in shown.stderr, (shown.stdout, shown.stderr)
        as_json = pilot_json(["rotation", "schedule", "--output", "json"], env, nexus)
        assert as_json["problem"] == schedule.problem
        whole = pilot(["status"], env, nexus)
        no_traceback(whole)
        assert whole.returncode == 0, whole.stderr
        assert "schedule" in whole.stdout
        status_json = pilot_json(["status", "--output", "json"], env, nexus)
        assert status_json["schedule_problem"] == schedule.problem

        # Set works on top of it (another field), and a valid schedule clears the problem.
        after = operator.SetRotationSchedule(operator_pb2.SetRotationScheduleRequest(
            schedule=operator_pb2.RotationSchedule(window="01:00-02:00"),
            update_fields=["window"]), timeout=RPC)
        assert after.window == "01:00-02:00" and not after.problem
        fixed = pilot_json(["rotation", "schedule", "--interval", "30d", "--output", "json"],
                           env, nexus)
        assert fixed["interval_seconds"] == 30 * DAY and "problem" not in fixed
        again = operator.GetRotationSchedule(operator_pb2.GetRotationScheduleRequest(), timeout=RPC)
        assert not again.problem and again.window == "01:00-02:00"
        assert not [e for e in nexus.log_events() if e.get("level") == "error"]

"""Scheduled rotation under injected time: interval, maintenance window, encryption counter.

In-process over a real SQLite store and key manager (``World`` from tests/harness.py), with
the key manager's and scheduler's clocks pinned; plus one real Nexus whose scheduler starts a
rotation by itself once the encryption-count trigger is reached.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nexus.core.errors import InvalidInput
from nexus.core.schedule import (
    DEFAULT_INTERVAL,
    DEFAULT_MAX_ENCRYPTIONS,
    NIST_LIMIT,
    Schedule,
    Scheduler,
    in_window,
    parse_window,
)
from pilot.commands.rotation import parse_duration
from pilot.errors import UsageError
from spike.states import RotationPhase
from tests.harness import (
    SUPERUSER,
    TEST_PASSWORD,
    DevAgent,
    Nexus,
    World,
    pilot,
    pilot_json,
    tamper,
)

DAY = 86400.0
T0 = datetime(2030, 1, 1, 0, 0, tzinfo=UTC).timestamp()  # key created at midnight UTC


def at(days: float, hhmm: str) -> float:
    """T0 + whole days, at HH:MM UTC."""
    h, m = (int(x) for x in hhmm.split(":"))
    return T0 + days * DAY + h * 3600 + m * 60


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture()
def world(tmp: Path, clock: Clock) -> Iterator[World]:
    w = World(tmp, clock=clock)
    yield w
    w.close()


def scheduler(world: World, clock: Clock) -> Scheduler:
    assert world.clock is clock  # the world's scheduler runs on the pinned clock
    return world.app.scheduler


# ---------------------------------------------------------------- parsing


def test_defaults_and_validation() -> None:
    assert Schedule() == Schedule(DEFAULT_INTERVAL, "", DEFAULT_MAX_ENCRYPTIONS)
    assert DEFAULT_INTERVAL == 90 * DAY
    assert DEFAULT_MAX_ENCRYPTIONS < NIST_LIMIT // 2
    for bad in (Schedule(interval_seconds=-1), Schedule(interval_seconds=30),
                Schedule(window="25:00-01:00"), Schedule(window="01:00-01:00"),
                Schedule(max_encryptions=0), Schedule(max_encryptions=NIST_LIMIT)):
        with pytest.raises(InvalidInput):
            bad.validate()
    assert Schedule(interval_seconds=0).validate().interval_seconds == 0  # off


def test_parse_duration_and_window() -> None:
    # Durations are parsed by Pilot; the API carries a protobuf Duration.
    assert parse_duration("90d") == 90 * DAY
    assert parse_duration("1h30m") == 5400
    assert parse_duration("3600") == 3600
    for bad in ("", "1y", "h", "1h 30m", "-5m"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    assert parse_window("01:30-03:00") == (90, 180)
    assert parse_window("23:00-02:00") == (1380, 120)
    for bad in ("1:30-03:00", "24:00-01:00", "01:00", "01:00-01:00"):
        with pytest.raises(InvalidInput):
            parse_window(bad)


@pytest.mark.parametrize(("window", "hhmm", "inside"), [
    ("", "13:37", True),
    ("01:00-03:00", "00:59", False),
    ("01:00-03:00", "01:00", True),
    ("01:00-03:00", "02:59", True),
    ("01:00-03:00", "03:00", False),
    ("23:00-02:00", "22:59", False),  # wraps past midnight
    ("23:00-02:00", "23:00", True),
    ("23:00-02:00", "00:30", True),
    ("23:00-02:00", "01:59", True),
    ("23:00-02:00", "02:00", False),
    ("23:00-02:00", "12:00", False),
])
def test_in_window(window: str, hhmm: str, inside: bool) -> None:
    assert in_window(window, at(5, hhmm)) is inside


# ---------------------------------------------------------------- decisions


def test_interval_due_and_not_due(world: World, clock: Clock) -> None:
    world.fill(paths=5, versions=1)
    sched = scheduler(world, clock)
    assert sched.next_rotation() == T0 + 90 * DAY
    assert sched.due(at(89, "23:59")) is None
    assert "interval" in (sched.due(at(90, "00:00")) or "")
    sched.set(interval_seconds=7 * DAY)
    assert sched.due(at(6, "12:00")) is None
    assert sched.due(at(7, "00:00")) is not None
    sched.set(interval_seconds=0)  # off: only the counter can trigger
    assert sched.due(at(900, "00:00")) is None
    assert sched.next_rotation() is None


def test_window_inside_outside_and_wrapping(world: World, clock: Clock) -> None:
    sched = scheduler(world, clock)
    sched.set(interval_seconds=DAY, window="01:00-03:00")
    assert sched.due(at(2, "00:30")) is None  # due by age, outside the window
    assert sched.due(at(2, "01:30")) is not None
    assert sched.due(at(2, "03:00")) is None
    sched.set(window="23:00-02:00")
    assert sched.due(at(2, "22:00")) is None
    assert sched.due(at(2, "23:30")) is not None
    assert sched.due(at(3, "01:00")) is not None
    assert sched.due(at(3, "02:30")) is None
    # Inside the window but not yet old enough.
    assert sched.due(at(0, "23:30")) is None


def test_encryption_count_trigger_ignores_interval_and_window(world: World,
                                                              clock: Clock) -> None:
    sched = scheduler(world, clock)
    sched.set(max_encryptions=50, window="01:00-03:00")
    for i in range(49):  # 49 encryptions; pruning keeps the last 10 versions (10 rows)
        world.secrets.put(SUPERUSER, "app/hot", {"n": str(i)}, None)
    assert sched.due(at(0, "12:00")) is None
    world.secrets.put(SUPERUSER, "app/hot", {"n": "49"}, None)  # the 50th encryption
    reason = sched.due(at(0, "12:00"))  # not old, outside the window: the counter decides
    assert reason is not None and "encryptions" in reason
    assert sched.tick(at(0, "12:00"))
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED and state.caller == "(scheduler)"
    assert "encryptions" in state.reason
    # The rotation's own encryptions count for the new generation.
    assert world.counter.counts().get(2, 0) == 10
    assert sched.due(at(0, "12:00")) is None
    assert world.secrets.get(SUPERUSER, "app/hot").data == {"n": "49"}


def test_counter_limit_below_record_count_does_not_rotate_forever(world: World,
                                                                  clock: Clock) -> None:
    sched = scheduler(world, clock)
    sched.set(max_encryptions=50)
    world.fill(paths=50, versions=1)
    assert sched.tick(at(0, "12:00"))
    assert world.wait().phase == RotationPhase.COMPLETED
    assert sched.due(at(0, "12:00")) is None


def test_tick_starts_a_rotation_and_the_new_key_resets_the_interval(world: World,
                                                                     clock: Clock) -> None:
    expected = world.fill(paths=10, versions=2)
    sched = scheduler(world, clock)
    clock.now = at(91, "00:00")
    assert sched.tick()
    state = world.wait()
    assert state.phase == RotationPhase.COMPLETED and "interval" in state.reason
    world.read_all(expected)
    assert sched.next_rotation() == at(91, "00:00") + 90 * DAY  # created at the clock's time
    assert sched.due(at(180, "00:00")) is None
    assert sched.due(at(181, "00:00")) is not None


def test_never_while_sealed(world: World, clock: Clock) -> None:
    sched = scheduler(world, clock)
    sched.set(max_encryptions=1)
    world.fill(paths=3, versions=1)
    assert sched.due(at(100, "00:00")) is not None
    world.keys.seal()
    assert sched.due(at(100, "00:00")) is None
    assert not sched.tick(at(100, "00:00"))
    assert world.engine.current is None


def test_not_while_a_rotation_runs(tmp: Path, clock: Clock) -> None:
    gate = threading.Event()
    paused = threading.Event()

    def between() -> None:  # in the worker, between two batches
        paused.set()
        gate.wait(300)  # until the test lets it go: no timing assumption

    world = World(tmp, clock=clock, between=between)
    try:
        world.fill(paths=30, versions=1)
        sched = scheduler(world, clock)
        world.engine.start(caller="test", batch_size=10, max_rate=1000)
        assert paused.wait(300)
        assert world.engine.running()
        assert sched.due(at(365, "00:00")) is None
        assert not sched.tick(at(365, "00:00"))
        gate.set()
        assert world.wait().phase == RotationPhase.COMPLETED
    finally:
        gate.set()
        world.close()


def test_not_after_a_failed_rotation(world: World, clock: Clock) -> None:
    world.fill(paths=12, versions=1)
    tamper(world.dir, "app/s003", 1)
    sched = scheduler(world, clock)
    sched.set(max_encryptions=1)
    world.engine.start(caller="test", batch_size=5)
    assert world.wait().phase == RotationPhase.FAILED
    assert sched.due(at(365, "00:00")) is None  # an operator must decide
    assert not sched.tick(at(365, "00:00"))
    world.secrets.destroy(SUPERUSER, "app/s003", [1])
    world.engine.resume("test")
    assert world.wait().phase == RotationPhase.COMPLETED
    assert sched.due(at(365, "00:00")) is not None  # the counter trigger is live again


def test_schedule_survives_recreating_everything(tmp: Path, clock: Clock) -> None:
    world = World(tmp, clock=clock)
    sched = scheduler(world, clock)
    saved = sched.set(interval_seconds=14 * DAY, window="22:00-04:00", max_encryptions=1000)
    world.fill(paths=2, versions=1)
    world.close()

    again = World(tmp, clock=clock, init=False)
    try:
        restored = scheduler(again, clock)
        assert restored.get() == saved
        assert restored.due(at(20, "12:00")) is None  # sealed after the restart
        again.keys.recover(TEST_PASSWORD.encode())
        assert restored.next_rotation() == T0 + 14 * DAY
        assert restored.due(at(13, "23:00")) is None
        assert restored.due(at(20, "12:00")) is None  # outside the window
        assert restored.due(at(20, "23:00")) is not None
    finally:
        again.close()


# ---------------------------------------------------------------- real Nexus


@pytest.mark.timeout(900)  # a hang guard: real processes, possibly on a loaded machine
def test_pilot_schedule_and_counter_trigger_in_a_real_nexus(agent: DevAgent,
                                                            data_dir: Path) -> None:
    """`spike rotation schedule` sets the schedule; Nexus's scheduler thread then starts a
    rotation by itself when the encryption counter passes the limit."""
    nexus = Nexus(data_dir, agent.env("nexus"), args=["--scheduler-check-seconds", "0.2"])
    try:
        env = agent.env("pilot")
        pilot_json(["init", "--password-stdin", "--output", "json"], env, nexus,
                   stdin=TEST_PASSWORD + "\n")
        shown = pilot_json(["rotation", "schedule", "--output", "json"], env, nexus)
        assert shown == {"interval_seconds": 90 * 86400, "window": "",
                         "max_encryptions": DEFAULT_MAX_ENCRYPTIONS}
        bad = pilot(["rotation", "schedule", "--window", "25:00-01:00"], env, nexus)
        assert bad.returncode == 2, bad.stderr
        set_ = pilot_json(["rotation", "schedule", "--interval", "30d", "--window",
                           "01:00-03:00", "--max-encryptions", "40", "--output", "json"],
                          env, nexus)
        assert set_ == {"interval_seconds": 30 * 86400, "window": "01:00-03:00",
                        "max_encryptions": 40}
        lines = data_dir / "import.jsonl"
        # 45 versions of one path: 45 encryptions, 10 rows kept (the rotation re-encrypts 10,
        # below the limit, so it does not trigger the next one).
        lines.write_text("".join(json.dumps({"path": "s/hot", "data": {"v": str(i)}}) + "\n"
                                 for i in range(45)))
        pilot_json(["secret", "import", "--file", str(lines), "--output", "json"], env, nexus)
        deadline = time.monotonic() + 300  # generous: a condition, not a speed
        while True:
            status = pilot_json(["rotation", "status", "--output", "json"], env, nexus)
            if status["phase"] == "completed":
                break
            assert time.monotonic() < deadline, (status, "".join(nexus.lines[-40:]))
            time.sleep(0.2)
        assert status["to_generation"] == 2
        audit = (data_dir / "audit.jsonl").read_text()
        assert '"(scheduler)"' in audit
        # The schedule is kept across a restart.
        nexus.stop()
        nexus = Nexus(data_dir, agent.env("nexus"))
        pilot_json(["recover", "--password-stdin", "--output", "json"], env, nexus,
                   stdin=TEST_PASSWORD + "\n")
        again = pilot_json(["rotation", "schedule", "--output", "json"], env, nexus)
        assert again == set_
        got = pilot_json(["secret", "get", "s/hot", "--output", "json"], env, nexus)
        assert got["data"] == {"v": "44"} and got["version"] == 45
        status = pilot_json(["status", "--output", "json"], env, nexus)
        assert status["root_key_generation"] == 2  # exactly one scheduled rotation
    finally:
        nexus.stop()

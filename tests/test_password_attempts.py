"""Password attempts are serialized: concurrent guesses cannot slip past the backoff."""

from __future__ import annotations

import threading
from pathlib import Path

from nexus.app import build_keys
from nexus.core import errors
from nexus.store import open_store
from pilot.commands.secrets import parse_pairs
from pilot.errors import UsageError
from tests.harness import nexus_config

PASSWORD = b"correct horse battery staple orbit"


def test_concurrent_wrong_passwords_count_once_then_back_off(tmp_path: Path) -> None:
    store = open_store("sqlite", path=tmp_path / "spike.db")
    # The held-back wrong answer is not what this test is about: answer at once.
    keys = build_keys(nexus_config(tmp_path, recover_backoff_seconds=30.0), store,
                      wrong_password_delay_cap=0.0)
    keys.init(PASSWORD)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def guess(i: int) -> None:
        barrier.wait()
        try:
            keys.verify_with_password(b"wrong guess number %d here" % i)
            outcomes.append("ok")
        except errors.WrongPassword:
            outcomes.append("wrong")
        except errors.TooManyAttempts:
            outcomes.append("backoff")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("wrong") == 1, outcomes
    assert outcomes.count("backoff") == 7, outcomes
    store.close()


def test_a_malformed_secret_argument_is_not_echoed() -> None:
    try:
        parse_pairs(["user=app", "s3cr3t-value"])
    except UsageError as exc:
        assert "s3cr3t" not in str(exc)
        assert "argument 2" in str(exc)
    else:
        raise AssertionError("a malformed pair was accepted")

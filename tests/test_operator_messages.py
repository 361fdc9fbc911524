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

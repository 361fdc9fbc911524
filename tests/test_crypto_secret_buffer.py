"""SecretBuffer / SecretKey: wiping, redaction, pickling refusal; process hardening."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest

from nexus.crypto.hardening import HardeningReport, secret_memory_status
from nexus.crypto.secret_buffer import SecretBuffer, SecretKey, live_buffer_counts
from spike.memory import wipe_bytearray


def test_from_bytes_consuming_copies_and_zeroes_source() -> None:
    source = bytearray(b"\x01\x02\x03\x04")
    buf = SecretBuffer.from_bytes_consuming(source)
    assert source == bytearray(4)
    assert buf.bytes_for_call() == b"\x01\x02\x03\x04"
    with buf.view() as view:
        assert bytes(view) == b"\x01\x02\x03\x04"
        assert view.readonly
    buf.wipe()


def test_wipe_zeroes_the_memory_and_is_idempotent() -> None:
    buf = SecretBuffer.from_bytes_consuming(bytearray(b"\xff" * 64))
    # Keep a view across the wipe to observe the very pages being zeroed.
    with buf.writable_view() as view:
        buf.wipe()
        assert bytes(view) == bytes(64)
    assert buf.wiped
    buf.wipe()
    with pytest.raises(ValueError), buf.view():
        pass
    with pytest.raises(ValueError):
        buf.bytes_for_call()


def test_context_manager_wipes() -> None:
    with SecretBuffer(8) as buf:
        assert not buf.wiped
    assert buf.wiped


def test_locked_is_reported() -> None:
    buf = SecretBuffer(32)
    assert isinstance(buf.locked, bool)
    live, locked = live_buffer_counts()
    assert live >= 1
    assert 0 <= locked <= live
    buf.wipe()
    assert not buf.locked


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SecretBuffer(0)
    with pytest.raises(TypeError):
        SecretBuffer.from_bytes_consuming(b"immutable")  # type: ignore[arg-type]


def test_pickle_and_copy_refused() -> None:
    buf = SecretBuffer(4)
    key = SecretKey.generate()
    for obj in (buf, key):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)


def test_repr_and_str_never_show_the_key() -> None:
    key = SecretKey.generate()
    raw = key.bytes_for_call()
    for text in (repr(key), str(key), repr(key.buffer), str(key.buffer), f"{key}"):
        assert "REDACTED" in text
        assert raw.hex() not in text
        assert raw.hex().upper() not in text
        assert repr(raw)[2:-1] not in text


def test_secret_key_generate_is_random_and_32_bytes() -> None:
    a, b = SecretKey.generate(), SecretKey.generate()
    assert len(a.bytes_for_call()) == 32
    assert a.bytes_for_call() != b.bytes_for_call()
    assert a.bytes_for_call() != bytes(32)


def test_secret_key_from_bytes_checks_length_and_zeroes() -> None:
    bad = bytearray(b"x" * 31)
    with pytest.raises(ValueError):
        SecretKey.from_bytes_consuming(bad)
    assert bad == bytearray(31)
    good = bytearray(range(32))
    key = SecretKey.from_bytes_consuming(good)
    assert good == bytearray(32)
    assert key.bytes_for_call() == bytes(range(32))
    with key:
        pass
    assert key.wiped


def test_wipe_bytearray() -> None:
    data = bytearray(b"secret")
    wipe_bytearray(data)
    assert data == bytearray(6)
    wipe_bytearray(bytearray())


def test_secret_memory_status_counts_live_buffers() -> None:
    before = secret_memory_status().live_buffers
    key = SecretKey.generate()
    assert secret_memory_status().live_buffers == before + 1
    key.wipe()
    assert secret_memory_status().live_buffers == before


def test_harden_process_in_a_child_process() -> None:
    # PR_SET_DUMPABLE=0 changes /proc ownership for the whole process: keep it out of pytest.
    code = (
        "import dataclasses, json, resource\n"
        "from nexus.crypto.hardening import harden_process\n"
        "r = harden_process()\n"
        "print(json.dumps(dataclasses.asdict(r)))\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    import json

    report = HardeningReport(**json.loads(out[0]))
    assert report.core_dumps_disabled
    assert out[1] == "(0, 0)"
    if sys.platform.startswith("linux"):
        assert report.dumpable_off


def test_live_probes_follow_the_process_state() -> None:
    """The probes metrics run at every scrape are hardening.py's own (one home)."""
    code = (
        "from nexus.crypto import hardening\n"
        "hardening.harden_process()\n"
        "print((hardening.core_dumps_disabled_now(), hardening.dumpable_off_now()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    after_dumpable = "True" if sys.platform.startswith("linux") else "False"
    assert out == f"(True, {after_dumpable})"

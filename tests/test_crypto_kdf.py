"""Argon2id: known answers (RFC 9106, phc-winner-argon2), parameter policy, buffer handling."""

from __future__ import annotations

import argon2.low_level as ll
import pytest

from nexus.crypto.kdf import KdfParams, _argon2id_into, derive
from nexus.crypto.secret_buffer import SecretBuffer


def _run(out_len: int, password: bytes, salt: bytes, **kw: object) -> bytes:
    out = SecretBuffer(out_len)
    _argon2id_into(out, password, salt, **kw)  # type: ignore[arg-type]
    try:
        return out.bytes_for_call()
    finally:
        out.wipe()


def test_rfc9106_section_5_3_argon2id_vector() -> None:
    # RFC 9106 5.3: t=3, m=32 KiB, p=4, P=0x01*32, S=0x02*16, K=0x03*8, X=0x04*12, T=32.
    tag = _run(
        32,
        b"\x01" * 32,
        b"\x02" * 16,
        time_cost=3,
        memory_kib=32,
        parallelism=4,
        secret=b"\x03" * 8,
        associated_data=b"\x04" * 12,
    )
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


@pytest.mark.parametrize(
    ("t", "m", "p", "expected"),
    [
        # phc-winner-argon2 src/test.c, argon2id v=0x13, password "password", salt "somesalt"
        (2, 256, 1, "9dfeb910e80bad0311fee20f9c0e2b12c17987b4cac90c2ef54d5b3021c68bfe"),
        (2, 256, 2, "6d093c501fd5999645e0ea3bf620d7b8be7fd2db59c20d9fff9539da2bf57037"),
        (2, 65536, 1, "09316115d5cf24ed5a15a31a3ba326e5cf32edc24702987c02b6566f61913cf7"),
    ],
)
def test_reference_vectors_without_secret_or_ad(t: int, m: int, p: int, expected: str) -> None:
    tag = _run(32, b"password", b"somesalt", time_cost=t, memory_kib=m, parallelism=p)
    assert tag.hex() == expected


def test_core_binding_agrees_with_hash_secret_raw() -> None:
    params = KdfParams.insecure_for_tests(time_cost=2, memory_kib=128, parallelism=2)
    password = bytearray(b"correct horse battery staple")
    salt = bytes(range(16))
    with derive(password, salt, params) as out:
        ours = out.bytes_for_call()
    theirs = ll.hash_secret_raw(bytes(password), salt, 2, 128, 2, 96, ll.Type.ID)
    assert ours == theirs
    assert password == bytearray(b"correct horse battery staple")  # caller keeps ownership


def test_defaults_are_rfc9106_second_recommendation() -> None:
    p = KdfParams()
    assert (p.time_cost, p.memory_kib, p.parallelism, p.salt_len, p.out_len) == (
        3,
        65536,
        4,
        16,
        96,
    )
    p.validate()
    p.require_production()


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(memory_kib=19455, time_cost=2),
        KdfParams(memory_kib=19456, time_cost=1),
        KdfParams(memory_kib=64, time_cost=1, parallelism=1),
    ],
)
def test_below_owasp_minimum_refused(params: KdfParams) -> None:
    with pytest.raises(ValueError, match="OWASP"):
        params.validate()
    with pytest.raises(ValueError):
        derive(bytearray(b"pw"), b"s" * 16, params)


def test_owasp_minimum_accepted() -> None:
    KdfParams(memory_kib=19456, time_cost=2, parallelism=1).validate()


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(memory_kib=4 * 1024 * 1024 + 1),
        KdfParams(time_cost=65),
        KdfParams(parallelism=65),
        KdfParams(parallelism=0),
        KdfParams(salt_len=8),
        KdfParams(out_len=8),
        KdfParams.insecure_for_tests(memory_kib=4 * 1024 * 1024 + 1),
        KdfParams(time_cost=True),
    ],
)
def test_sanity_bounds_refused_even_in_test_mode(params: KdfParams) -> None:
    with pytest.raises(ValueError):
        params.validate()


def test_test_mode_is_explicit_and_refused_in_production() -> None:
    cheap = KdfParams.insecure_for_tests()
    cheap.validate()
    assert not cheap.meets_owasp_minimum
    with pytest.raises(ValueError, match="production"):
        cheap.require_production()


def test_derive_needs_bytearray_and_matching_salt() -> None:
    cheap = KdfParams.insecure_for_tests()
    with pytest.raises(TypeError):
        derive(b"immutable", b"s" * 16, cheap)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        derive(bytearray(b"pw"), b"short", cheap)

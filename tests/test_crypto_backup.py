"""Password-sealed backup: round trip, tamper, wrong password, corruption, versions, reseal."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from nexus.backup.format import (
    SEALED_LEN,
    Backup,
    BackupCorrupt,
    BackupError,
    BackupKdfRejected,
    BackupVersionUnsupported,
    FingerprintMismatch,
    SealedGeneration,
    WrongPassword,
    create_backup,
    open_backup,
    verify_structure,
)
from nexus.crypto.kdf import KdfParams
from nexus.crypto.keys import fingerprint
from nexus.crypto.secret_buffer import SecretKey

CHEAP = KdfParams.insecure_for_tests()
PASSWORD = b"a long and boring test password"


def pw() -> bytearray:
    return bytearray(PASSWORD)


def make(n: int = 2) -> tuple[Backup, dict[int, SecretKey]]:
    keys = {g: SecretKey.generate() for g in range(1, n + 1)}
    backup, public_key = create_backup(pw(), keys, CHEAP)
    assert public_key == backup.public_key
    return backup, keys


def parse(data: bytes) -> Backup:
    return Backup.parse(data, allow_insecure_kdf_for_tests=True)


def same(a: SecretKey, b: SecretKey) -> bool:
    return a.bytes_for_call() == b.bytes_for_call()


def rewrite(data: bytes, edit: Callable[[dict[str, Any]], None], fix_checksum: bool) -> bytes:
    doc = json.loads(data)
    edit(doc)
    if fix_checksum:
        body = {k: v for k, v in doc.items() if k != "checksum"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        doc["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(doc).encode()


def test_round_trip_through_bytes() -> None:
    backup, keys = make(3)
    parsed = parse(backup.to_bytes())
    assert parsed == backup
    assert parsed.generations == (1, 2, 3)
    assert parsed.fingerprints() == {g: fingerprint(k) for g, k in keys.items()}
    assert parsed.matches({g: fingerprint(k) for g, k in keys.items()})
    assert not parsed.matches({1: fingerprint(keys[1])})
    recovered, _ = open_backup(parsed, pw())
    assert set(recovered) == {1, 2, 3}
    assert all(same(recovered[g], keys[g]) for g in keys)


def test_file_is_self_describing_json() -> None:
    backup, _ = make(1)
    doc = json.loads(backup.to_bytes())
    assert doc["format"] == "spike-nexus-backup"
    assert doc["version"] == 1
    assert doc["kdf"]["algorithm"] == "argon2id"
    assert doc["hpke"] == {"kem": "MLKEM768_X25519", "kdf": "HKDF_SHA256", "aead": "AES_256_GCM"}
    assert len(base64.b64decode(doc["public_key"])) == 1216
    assert len(base64.b64decode(doc["generations"][0]["sealed"])) == SEALED_LEN


def test_password_is_not_consumed_and_not_in_file() -> None:
    password = pw()
    backup, _ = create_backup(password, {1: SecretKey.generate()}, CHEAP)
    assert password == bytearray(PASSWORD)
    assert PASSWORD not in backup.to_bytes()


def test_wrong_password() -> None:
    backup, _ = make()
    with pytest.raises(WrongPassword) as info:
        open_backup(backup, bytearray(b"a long and boring test passworD"))
    assert "boring" not in str(info.value)


def test_every_byte_of_every_sealed_blob_flipped_fails() -> None:
    backup, _ = make(2)
    for index, item in enumerate(backup.sealed):
        for i in range(len(item.sealed)):
            blob = bytearray(item.sealed)
            blob[i] ^= 0x01
            sealed = list(backup.sealed)
            sealed[index] = SealedGeneration(item.generation, item.fingerprint, bytes(blob))
            tampered = Backup(backup.params, backup.salt, backup.public_key, tuple(sealed))
            # Corrupt sealed blob (checksum fixed up by to_bytes): still refused on open.
            with pytest.raises(BackupCorrupt):
                open_backup(parse(tampered.to_bytes()), pw())


def test_checksum_catches_any_edit_without_password() -> None:
    backup, _ = make(1)

    def flip_sealed(doc: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(doc["generations"][0]["sealed"]))
        raw[100] ^= 1
        doc["generations"][0]["sealed"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(BackupCorrupt, match="checksum"):
        parse(rewrite(backup.to_bytes(), flip_sealed, fix_checksum=False))


def test_relabelled_generation_fails_to_open() -> None:
    backup, _ = make(2)
    a, b = backup.sealed
    swapped = Backup(
        backup.params,
        backup.salt,
        backup.public_key,
        (
            SealedGeneration(1, a.fingerprint, b.sealed),
            SealedGeneration(2, b.fingerprint, a.sealed),
        ),
    )
    with pytest.raises(BackupCorrupt):
        open_backup(parse(swapped.to_bytes()), pw())


def test_fingerprint_mismatch_refused() -> None:
    backup, _ = make(1)

    def bad_fp(doc: dict[str, Any]) -> None:
        doc["generations"][0]["fingerprint"] = "00" * 16

    tampered = parse(rewrite(backup.to_bytes(), bad_fp, fix_checksum=True))
    # The fingerprint is bound in the HPKE info, so opening itself fails...
    with pytest.raises(BackupCorrupt):
        open_backup(tampered, pw())


def test_fingerprint_mismatch_after_successful_open(monkeypatch: pytest.MonkeyPatch) -> None:
    # ...and should a key ever open but not match its fingerprint, it is refused too.
    backup, _ = make(1)
    import nexus.backup.format as bf

    monkeypatch.setattr(bf, "fingerprint", lambda key: b"\xee" * 16)
    with pytest.raises(FingerprintMismatch):
        open_backup(backup, pw())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b'{"format": "something-else", "version": 1}',
        b"null",
    ],
)
def test_garbage_is_corrupt(data: bytes) -> None:
    with pytest.raises(BackupCorrupt):
        parse(data)


def test_truncated_is_corrupt() -> None:
    data = make(1)[0].to_bytes()
    for cut in (1, 10, len(data) // 2, len(data) - 3):
        with pytest.raises(BackupCorrupt):
            parse(data[:cut])


def test_unknown_version_is_unsupported() -> None:
    data = make(1)[0].to_bytes()

    def bump(doc: dict[str, Any]) -> None:
        doc["version"] = 2

    with pytest.raises(BackupVersionUnsupported, match="version 2"):
        parse(rewrite(data, bump, fix_checksum=True))
    with pytest.raises(BackupVersionUnsupported):
        parse(rewrite(data, lambda d: d.pop("version"), fix_checksum=False))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(extra=1),
        lambda d: d["kdf"].update(time_cost="3"),
        lambda d: d["kdf"].update(time_cost=True),
        lambda d: d["kdf"].update(algorithm="argon2i"),
        lambda d: d["hpke"].update(kem="X25519"),
        lambda d: d.update(salt="not base64!"),
        lambda d: d.update(salt=base64.b64encode(b"x" * 8).decode()),
        lambda d: d.update(public_key=base64.b64encode(b"x" * 10).decode()),
        lambda d: d.update(generations=[]),
        lambda d: d["generations"].append(dict(d["generations"][0])),
        lambda d: d["generations"][0].update(generation=0),
        lambda d: d["generations"][0].update(fingerprint="abc"),
        lambda d: d["generations"][0].update(sealed=base64.b64encode(b"short").decode()),
    ],
)
def test_structure_violations_are_corrupt(edit: Callable[[dict[str, Any]], None]) -> None:
    data = make(1)[0].to_bytes()
    with pytest.raises(BackupCorrupt):
        parse(rewrite(data, edit, fix_checksum=True))


def test_duplicate_json_keys_refused() -> None:
    data = make(1)[0].to_bytes()
    doubled = data.replace(b'"version": 1', b'"version": 1, "version": 1', 1)
    assert doubled != data
    with pytest.raises(BackupCorrupt):
        parse(doubled)


def test_weak_params_refused_on_create_and_parse() -> None:
    weak = KdfParams(time_cost=1, memory_kib=1024, parallelism=1)
    with pytest.raises(ValueError, match="OWASP"):
        create_backup(pw(), {1: SecretKey.generate()}, weak)
    data = make(1)[0].to_bytes()
    with pytest.raises(BackupKdfRejected):
        Backup.parse(data)  # cheap test params are refused without the test flag
    assert parse(data).params.insecure_for_tests_only


def test_hostile_params_refused_even_in_test_mode() -> None:
    data = make(1)[0].to_bytes()
    for field, value in (("memory_kib", 2**40), ("time_cost", 10**6), ("parallelism", 1000)):

        def edit(d: dict[str, Any], f: str = field, v: int = value) -> None:
            d["kdf"][f] = v

        hostile = rewrite(data, edit, True)
        with pytest.raises(BackupKdfRejected):
            parse(hostile)


def test_oversized_file_refused() -> None:
    with pytest.raises(BackupCorrupt):
        parse(b" " * (1024 * 1024 + 1))


def test_reseal_after_adding_a_generation_needs_no_password() -> None:
    backup, keys = make(1)
    new_key = SecretKey.generate()
    resealed = backup.reseal({1: keys[1], 2: new_key})
    assert resealed.generations == (1, 2)
    assert resealed.public_key == backup.public_key
    assert resealed.salt == backup.salt
    recovered, _ = open_backup(parse(resealed.to_bytes()), pw())
    assert same(recovered[2], new_key)
    assert same(recovered[1], keys[1])
    # finalize a rotation: drop generation 1
    final = resealed.reseal({2: new_key})
    assert open_backup(final, pw())[0].keys() == {2}


def test_reseal_refuses_a_different_key_for_a_known_generation() -> None:
    backup, _ = make(1)
    with pytest.raises(ValueError, match="fingerprint"):
        backup.reseal({1: SecretKey.generate()})
    with pytest.raises(ValueError):
        backup.reseal({})


def test_create_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        create_backup(pw(), {}, CHEAP)
    with pytest.raises(ValueError):
        create_backup(pw(), {0: SecretKey.generate()}, CHEAP)
    wiped = SecretKey.generate()
    wiped.wipe()
    with pytest.raises(ValueError):
        create_backup(pw(), {1: wiped}, CHEAP)


def test_verify_structure_without_password() -> None:
    backup, _ = make(1)
    verify_structure(backup)
    broken = Backup(backup.params, backup.salt, backup.public_key, ())
    with pytest.raises(BackupCorrupt):
        verify_structure(broken)


def test_no_key_material_or_password_in_reprs_and_errors() -> None:
    keys = {1: SecretKey.generate()}
    raw = keys[1].bytes_for_call()
    backup, public_key = create_backup(pw(), keys, CHEAP)
    texts = [repr(backup), str(backup), repr(public_key), repr(backup.sealed[0])]
    try:
        open_backup(backup, bytearray(b"wrong password, quite long"))
    except BackupError as exc:
        texts.append(str(exc) + repr(exc))
    recovered, record_key = open_backup(backup, pw())
    texts += [repr(recovered), str(recovered), repr(record_key), str(record_key)]
    for text in texts:
        assert raw.hex() not in text
        assert repr(raw)[2:-1] not in text
        assert "boring" not in text
        assert base64.b64encode(raw).decode() not in text

"""NIST SP 800-63B-4 password policy."""

from __future__ import annotations

import unicodedata

import pytest

from nexus.core.password_policy import PasswordRejected, check_password

GOOD = "violet kettle drums at noon"


def rejected(password: str | bytes) -> PasswordRejected:
    with pytest.raises(PasswordRejected) as info:
        check_password(password)
    text = str(info.value)
    if isinstance(password, str) and len(password) >= 4:
        assert password not in text
        assert password.casefold() not in text.casefold()
    return info.value


def test_good_passphrase_accepted_as_normalised_utf8() -> None:
    out = check_password(GOOD)
    assert isinstance(out, bytearray)
    assert out == bytearray(GOOD.encode())


def test_too_short() -> None:
    assert rejected("Xk3!vq9#Lm2$pQ").code == "too_short"  # 14 characters


def test_too_long() -> None:
    assert rejected("x7Kq" * 257).code == "too_long"  # 1028 characters
    check_password(("zebra mango quartz violet " * 40)[:1023] + "q")  # exactly 1024


@pytest.mark.parametrize(
    "password",
    [
        "password1234567",
        "password123456789",
        "1234567890123456",
        "qwertyuiopasdfgh",
        "iloveyou!!!!!!!!!!",
        "!!!dragon2024!!!",
        "monkeymonkeymonkey",
        "aaaaaaaaaaaaaaaaaaaa",
        "abcabcabcabcabcabc",
        "PASSWORD1234567",
        "Passwordpassword",
        "1qaz2wsx3edc4rfv",
    ],
)
def test_common_padded_repeated_rejected(password: str) -> None:
    reason = rejected(password)
    assert reason.code in {"common", "repetitive", "common_padded", "guessable"}
    assert reason.reason


def test_blocklisted_long_common_password() -> None:
    # "1qaz2wsx3edc4rfv" is itself in zxcvbn's bundled list of frequent passwords.
    assert rejected("1qaz2wsx3edc4rfv").code == "common"


def test_nfkc_equivalence() -> None:
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in GOOD)
    assert fullwidth != GOOD
    assert check_password(fullwidth) == check_password(GOOD)
    # The blocklist sees the normalised form too.
    wide_common = "".join(chr(ord(c) + 0xFEE0) for c in "password1234567")
    assert rejected(wide_common).code in {"common_padded", "guessable"}


def test_fifteen_unicode_characters_accepted() -> None:
    password = "жёлтый🦊ḱ漢字ℵ∂ßøÆ"  # noqa: S105 - test input
    password = unicodedata.normalize("NFKC", password)
    assert len(password) == 15
    out = check_password(password)
    assert out.decode("utf-8") == password
    assert len(out) > 15  # bytes, not characters, grow


def test_bytes_input_and_invalid_utf8() -> None:
    assert check_password(GOOD.encode()) == bytearray(GOOD.encode())
    assert rejected(b"\xff" * 20).code == "not_utf8"


def test_no_composition_rules() -> None:
    # Lowercase letters and spaces only: fine.
    check_password("plenty of quiet river stones")

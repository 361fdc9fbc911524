"""NIST SP 800-63B-4 password policy."""

from __future__ import annotations

import random
import string
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zxcvbn.frequency_lists import FREQUENCY_LISTS

from nexus.core.password_policy import PasswordRejected, check_password
from tests.harness import DevAgent, Nexus, pilot, pilot_json

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


# ------------------------------------------------------------------ past zxcvbn's 72 characters
# zxcvbn looks at 72 characters at most; before, anything longer skipped that check.

LONG_WEAK = [
    "a" * 72 + "b",
    "password " * 8 + "x",
    "iloveyou" * 9 + "x",
    "ab" * 38 + "c",
    "x" + "a" * 72,
    "Password1" * 9,
    "abcdefghijklmnopqrstuvwxyz" * 3,
    "qwertyuiop" * 7 + "!!!",
    "monkey " + "z" * 70,
    "dragon" + "123" * 30,
]


@pytest.mark.parametrize("password", LONG_WEAK, ids=range(len(LONG_WEAK)))
def test_weak_passwords_longer_than_72_characters_are_rejected(password: str) -> None:
    assert len(password) > 72
    assert rejected(password).code in {"common", "repetitive", "common_padded", "guessable"}


def _band_words() -> list[str]:
    """Diceware-style words: common English words, but not the most common few thousand."""
    words = FREQUENCY_LISTS["english_wikipedia"][3000:12000]
    return sorted({w for w in words if w.isalpha() and w.isascii() and 4 <= len(w) <= 8})


BAND = _band_words()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64), words=st.integers(5, 16))
def test_good_passphrases_of_any_length_pass(seed: int, words: int) -> None:
    """Random words, five (under 72 characters) up to sixteen (well over)."""
    phrase = " ".join(random.Random(seed).sample(BAND, words))
    check_password(phrase)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64), length=st.integers(73, 1024))
def test_long_random_strings_pass(seed: int, length: int) -> None:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    rng = random.Random(seed)
    check_password("".join(rng.choice(alphabet) for _ in range(length)))


def test_long_passphrase_with_a_repeated_strong_part_passes() -> None:
    # Repetition of a strong unit adds nothing, but takes nothing away either.
    strong = "violet kettle drums at noon, 7 quartz owls"
    check_password(strong + " / " + strong)


_WEAK_UNITS = st.sampled_from([w for w in FREQUENCY_LISTS["passwords"][:300] if len(w) >= 3]) \
    | st.text(alphabet="ab1!", min_size=1, max_size=3)


def _refused(password: str) -> bool:
    try:
        check_password(password)
    except PasswordRejected:
        return True
    return False


@settings(max_examples=150, deadline=None)
@given(unit=_WEAK_UNITS, before=st.text(alphabet=string.digits + "!.", max_size=2),
       after=st.text(alphabet=string.digits + "!.x", max_size=2),
       title=st.booleans(), sep=st.sampled_from(["", " ", "-"]))
def test_repeating_a_refused_password_past_72_characters_never_gets_it_accepted(
        unit: str, before: str, after: str, title: bool, sep: str) -> None:
    """Length by repetition adds nothing: if the unit said twice (as zxcvbn can still see it
    whole) is refused, it stays refused however many times it is repeated."""
    unit = unit.title() if title else unit
    short = before + sep.join([unit] * 2) + after
    long = before + sep.join([unit] * (80 // (len(unit) + len(sep)) + 2)) + after
    assert len(short) <= 72 < len(long)
    if _refused(short):
        rejected(long)


# ------------------------------------------------------------------ through a real Nexus


def test_spike_init_and_password_change_refuse_long_weak_passwords(agent: DevAgent,
                                                                   nexus: Nexus) -> None:
    """The policy runs in Nexus: `spike init` and `spike password change` refuse them (exit 2,
    the password never echoed), and a long good passphrase is taken."""
    for password in ["a" * 72 + "b", "password " * 8 + "x", "iloveyou" * 9 + "x", "ab" * 38 + "c"]:
        result = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                       stdin=password + "\n")
        assert result.returncode == 2, (password, result)
        assert password not in result.stderr and "repeats itself" in result.stderr
    state = pilot_json(["status", "--output", "json"], agent.env("pilot"), nexus)["state"]
    assert state == "uninitialized"
    good = "violet kettle drums at noon " + " ".join(random.Random(7).sample(BAND, 10))
    assert len(good) > 72
    result = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus, stdin=good + "\n")
    assert result.returncode == 0, result
    weak_new = "iloveyou" * 9 + "x"
    change = pilot(["password", "change", "--password-stdin"], agent.env("pilot"), nexus,
                   stdin=f"{good}\n{weak_new}\n")
    assert change.returncode == 2 and "repeats itself" in change.stderr, change
    assert weak_new not in change.stderr

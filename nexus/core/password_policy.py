"""Backup password policy, after NIST SP 800-63B-4 section 3.1.1.2.

- Unicode NFKC normalisation first, then every code point counts as one character;
- at least 15 and at most 1024 characters; any characters, spaces included;
- no composition rules (no "one digit, one symbol");
- rejected when it is, or is trivially built from, a commonly used password: zxcvbn's bundled
  list of frequent passwords, a common password padded with digits/symbols, a short unit or a
  common password repeated, or a pattern zxcvbn estimates as guessable in under 10**8 guesses.

:func:`check_password` returns the normalised UTF-8 bytes in a ``bytearray`` the caller owns and
should wipe after use. :class:`PasswordRejected` explains why without ever echoing the password.
"""

from __future__ import annotations

import string
import unicodedata
from functools import lru_cache

from zxcvbn import zxcvbn
from zxcvbn.frequency_lists import FREQUENCY_LISTS

__all__ = [
    "MAX_PASSWORD_CHARS",
    "MIN_GUESSES",
    "MIN_PASSWORD_CHARS",
    "PasswordRejected",
    "check_password",
    "normalize_password",
]

MIN_PASSWORD_CHARS = 15
MAX_PASSWORD_CHARS = 1024
MIN_GUESSES = 10**8
_ZXCVBN_MAX = 72  # zxcvbn refuses longer inputs (and is slow on them)
_PADDING = set(string.digits + string.punctuation + string.whitespace)


class PasswordRejected(ValueError):
    """The password does not meet the policy. ``reason`` is safe to show; it never echoes it."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    return frozenset(FREQUENCY_LISTS["passwords"])


def normalize_password(password: str | bytes | bytearray) -> str:
    """Decode (strict UTF-8 for bytes) and NFKC-normalise. Raises :class:`PasswordRejected`."""
    if isinstance(password, bytes | bytearray):
        if len(password) > 4 * MAX_PASSWORD_CHARS:
            raise PasswordRejected(
                "too_long", f"the password must be at most {MAX_PASSWORD_CHARS} characters"
            )
        try:
            text = bytes(password).decode("utf-8")
        except UnicodeDecodeError:
            raise PasswordRejected("not_utf8", "the password is not valid UTF-8") from None
    elif isinstance(password, str):
        text = password
    else:
        raise TypeError("password must be str, bytes or bytearray")
    if len(text) > 4 * MAX_PASSWORD_CHARS:
        # Bound the work NFKC does on hostile input.
        raise PasswordRejected(
            "too_long", f"the password must be at most {MAX_PASSWORD_CHARS} characters"
        )
    return unicodedata.normalize("NFKC", text)


def _repeated_unit(text: str) -> str | None:
    """The shortest unit that ``text`` is two or more repetitions of, else ``None``."""
    n = len(text)
    for size in range(1, n // 2 + 1):
        if n % size == 0 and text[:size] * (n // size) == text:
            return text[:size]
    return None


def _strip_padding(text: str) -> str:
    start, end = 0, len(text)
    while start < end and text[start] in _PADDING:
        start += 1
    while end > start and text[end - 1] in _PADDING:
        end -= 1
    return text[start:end]


def _blocklist_reason(text: str) -> PasswordRejected | None:
    common = _common_passwords()
    folded = text.casefold()
    compact = "".join(folded.split())
    if folded in common or compact in common:
        return PasswordRejected("common", "this password is on a list of commonly used passwords")
    unit = _repeated_unit(compact)
    if unit is not None and (len(unit) <= 4 or unit in common or _strip_padding(unit) in common):
        return PasswordRejected(
            "repetitive", "this password is a short pattern or a common password repeated"
        )
    core = _strip_padding(compact)
    if core != compact and (not core or core in common or _repeated_unit(core) is not None):
        return PasswordRejected(
            "common_padded",
            "this password is a commonly used password padded with digits or symbols",
        )
    if len(text) <= _ZXCVBN_MAX:
        result = zxcvbn(text)
        if float(result["guesses"]) < MIN_GUESSES:
            warning = str(result.get("feedback", {}).get("warning") or "").strip()
            detail = f" ({warning})" if warning else ""
            return PasswordRejected(
                "guessable", f"this password is built from common words or patterns{detail}"
            )
    return None


def check_password(password: str | bytes | bytearray) -> bytearray:
    """Apply the policy; return the NFKC-normalised password as UTF-8 in a new ``bytearray``.

    Raises :class:`PasswordRejected` with a reason (and a stable ``code``: ``too_short``,
    ``too_long``, ``not_utf8``, ``common``, ``repetitive``, ``common_padded``, ``guessable``).
    """
    text = normalize_password(password)
    length = len(text)
    if length < MIN_PASSWORD_CHARS:
        raise PasswordRejected(
            "too_short",
            f"the password must be at least {MIN_PASSWORD_CHARS} characters; "
            "a few unrelated words make a good one",
        )
    if length > MAX_PASSWORD_CHARS:
        raise PasswordRejected(
            "too_long", f"the password must be at most {MAX_PASSWORD_CHARS} characters"
        )
    rejection = _blocklist_reason(text)
    if rejection is not None:
        raise rejection
    return bytearray(text.encode("utf-8"))

"""Backup password policy, after NIST SP 800-63B-4 section 3.1.1.2.

- Unicode NFKC normalisation first, then every code point counts as one character;
- at least 15 and at most 1024 characters; any characters, spaces included;
- no composition rules (no "one digit, one symbol");
- rejected when it is, or is trivially built from, a commonly used password: zxcvbn's bundled
  list of frequent passwords, a common password padded with digits/symbols, a short unit or a
  common password repeated, or a pattern zxcvbn estimates as guessable in under 10**8 guesses.
- zxcvbn itself refuses inputs over 72 characters (its cost grows steeply with length), so a
  longer password is judged whole another way: every stretch that repeats earlier text (four
  characters or more, overlaps included, case ignored) is dropped, since it costs an attacker
  next to nothing. What is left must itself be at least 15 characters, not a common password
  (padded or repeated), and at least 10**8 guesses by zxcvbn in pieces of at most 36 characters
  (cut at a space where one is near) whose guesses multiply. ``'a'*72+'b'`` leaves ``ab`` and
  ``'password '*8+'x'`` leaves ``password x``: both refused.

:func:`check_password` returns the normalised UTF-8 bytes in a ``bytearray`` the caller owns and
should wipe after use. :class:`PasswordRejected` explains why without ever echoing the password.
"""

from __future__ import annotations

import math
import string
import unicodedata
from functools import lru_cache

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
_MIN_GUESSES_LOG10 = math.log10(MIN_GUESSES)
_ZXCVBN_MAX = 72  # zxcvbn refuses longer inputs (and is slow on them)
_MIN_COPY = 4  # a repeat of earlier text this long or longer adds (almost) no strength
_PIECE = 36  # zxcvbn's cost grows fast with length (up to ~1 s at 72 characters, ~30 ms here)
_PADDING = set(string.digits + string.punctuation + string.whitespace)


class PasswordRejected(ValueError):
    """The password does not meet the policy. ``reason`` is safe to show; it never echoes it."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # loaded on first use (slow import)

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


def _novel_part(text: str) -> str:
    """``text`` without every stretch of ``_MIN_COPY`` or more characters that repeats text
    seen before it (the copy may overlap its source, so a run like ``aaaa`` is one copy).

    A greedy Lempel-Ziv factorisation: at each position the longest earlier copy is skipped,
    else one character is kept. Case-insensitive, as an attacker's rules would be.
    """
    folded = text.lower() if len(text.lower()) == len(text) else text
    kept: list[str] = []
    i, n = 0, len(text)
    while i < n:
        size = _MIN_COPY
        # folded[i:i+size] occurs in folded[:i+size-1], i.e. starts before i.
        while i + size <= n and folded.find(folded[i:i + size], 0, i + size - 1) >= 0:
            size += 1
        if size > _MIN_COPY:
            i += size - 1
        else:
            kept.append(text[i])
            i += 1
    return "".join(kept)


def _pieces(text: str, size: int = _PIECE) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, at a space where one is near."""
    out = []
    while len(text) > size:
        cut = text.rfind(" ", size // 2, size) + 1 or size
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


def _guesses_log10(text: str, enough: float) -> float:
    """log10 of zxcvbn's guesses for ``text`` of any length, as the product of its pieces'
    guesses; stops once ``enough`` is reached."""
    from zxcvbn import zxcvbn

    total = 0.0
    for piece in _pieces(text):
        total += float(zxcvbn(piece)["guesses_log10"])
        if total >= enough:
            break
    return total


def _strip_padding(text: str) -> str:
    start, end = 0, len(text)
    while start < end and text[start] in _PADDING:
        start += 1
    while end > start and text[end - 1] in _PADDING:
        end -= 1
    return text[start:end]


def _common_reason(text: str) -> PasswordRejected | None:
    """Is ``text`` a common password, a short unit or a common password repeated, or a common
    password padded with digits and symbols?"""
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
    return None


_REPEATS_ITSELF = ("repetitive",
                   "this password mostly repeats itself: its length adds little strength")


def _blocklist_reason(text: str) -> PasswordRejected | None:
    rejection = _common_reason(text)
    if rejection is not None:
        return rejection
    if len(text) <= _ZXCVBN_MAX:
        from zxcvbn import zxcvbn

        result = zxcvbn(text)
        if float(result["guesses"]) < MIN_GUESSES:
            warning = str(result.get("feedback", {}).get("warning") or "").strip()
            detail = f" ({warning})" if warning else ""
            return PasswordRejected(
                "guessable", f"this password is built from common words or patterns{detail}"
            )
        return None
    # Too long for zxcvbn: judge what is left once the repeats are dropped.
    novel = _novel_part(text)
    if len(novel) < len(text) and (len(novel) < MIN_PASSWORD_CHARS
                                   or _common_reason(novel) is not None):
        return PasswordRejected(*_REPEATS_ITSELF)
    if _guesses_log10(novel, _MIN_GUESSES_LOG10) < _MIN_GUESSES_LOG10:
        if len(novel) * 2 <= len(text):
            return PasswordRejected(*_REPEATS_ITSELF)
        return PasswordRejected("guessable", "this password is built from common words or patterns")
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

"""Path grammar: the one-regex fast path of check_path accepts exactly what the
segment-by-segment rules accept (those rules also produce the error messages)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.core import validation
from nexus.core.errors import InvalidInput
from nexus.core.validation import MAX_PATH_CHARS, MAX_SEGMENT_CHARS, check_path


def accepted(check: object, path: str) -> bool:
    try:
        check(path)  # type: ignore[operator]
    except InvalidInput:
        return False
    return True


# Mostly the characters that matter to the grammar, so that hypothesis finds the edges
# ("." and ".." segments, empty segments, long segments), plus anything else.
_EDGE = st.sampled_from(["a", "Z", "0", ".", "..", "/", "//", "_", "-", " ", "\n", "é", "\x00",
                         "a" * MAX_SEGMENT_CHARS, "b" * (MAX_SEGMENT_CHARS + 1), "٣"])
paths = st.one_of(
    st.lists(_EDGE, max_size=12).map("".join),
    st.text(max_size=40),
)


@settings(max_examples=2000, deadline=None)
@given(path=paths)
def test_fast_path_accepts_exactly_what_the_rules_accept(path: str) -> None:
    assert accepted(check_path, path) == accepted(validation._check_path_slowly, path)


@pytest.mark.parametrize("path, ok", [
    ("app/db", True),
    ("a", True),
    ("v1.2/app..x/.hidden/x.", True),  # dots inside a segment are fine
    ("...", True),
    (".", False),
    ("..", False),
    ("a/./b", False),
    ("a/../b", False),
    ("./a", False),
    ("a/..", False),
    ("", False),
    ("/a", False),
    ("a/", False),
    ("a//b", False),
    ("a/b\n", False),  # a trailing newline is not "end of string" here
    ("a b", False),
    ("é", False),
    ("٣", False),  # a non-ASCII digit
    ("x" * MAX_SEGMENT_CHARS, True),
    ("x" * (MAX_SEGMENT_CHARS + 1), False),
    (("y" * 100 + "/") * 5 + "z" * (MAX_PATH_CHARS - 505), True),  # exactly the limit
    (("y" * 100 + "/") * 5 + "z" * (MAX_PATH_CHARS - 504), False),  # one over
])
def test_path_grammar_cases(path: str, ok: bool) -> None:
    assert accepted(check_path, path) is ok
    assert accepted(validation._check_path_slowly, path) is ok

"""Input rules for paths, names and secret data. Every refusal is an InvalidInput with
a message that says what is allowed (and never echoes a value)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from nexus.core.errors import InvalidInput

MAX_PATH_CHARS = 512
MAX_SEGMENT_CHARS = 128
MAX_KEY_CHARS = 256
MAX_KEYS = 1024
MAX_POLICY_NAME_CHARS = 128
MAX_PATTERN_CHARS = 1024
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 5000
# A page token holds its last path (512 characters through the API): 16 Ki characters
# leave room for the longer paths an edited database may hold.
MAX_PAGE_TOKEN_CHARS = 16 * 1024

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Every valid path matches this (segments of allowed characters and length, no empty
# segment); "." and ".." segments are checked apart. One match instead of a loop: this
# runs on every secret read. A path it refuses goes through the loop for the message.
_VALID_PATH = re.compile(
    rf"[A-Za-z0-9._-]{{1,{MAX_SEGMENT_CHARS}}}(?:/[A-Za-z0-9._-]{{1,{MAX_SEGMENT_CHARS}}})*")


def check_path(path: str) -> str:
    if len(path) <= MAX_PATH_CHARS and _VALID_PATH.fullmatch(path):
        if "." not in path:
            return path
        framed = f"/{path}/"
        if "/./" not in framed and "/../" not in framed:
            return path
    return _check_path_slowly(path)


def _check_path_slowly(path: str) -> str:
    if not path:
        raise InvalidInput("the secret path is empty")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidInput(f"the secret path is longer than {MAX_PATH_CHARS} characters")
    segments = path.split("/")
    for segment in segments:
        if not segment:
            raise InvalidInput("the secret path has an empty segment (leading, trailing or "
                               "double '/')")
        if segment in (".", ".."):
            raise InvalidInput("the secret path may not contain '.' or '..' segments")
        if len(segment) > MAX_SEGMENT_CHARS:
            raise InvalidInput(f"a path segment is longer than {MAX_SEGMENT_CHARS} characters")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidInput("path segments may contain only letters, digits, '.', '_' "
                               "and '-', separated by '/'")
    return path


def check_prefix(prefix: str) -> str:
    if not prefix:
        return prefix
    trimmed = prefix.rstrip("/")
    if trimmed:
        check_path(trimmed)
    return prefix


def check_data(data: Mapping[str, str], max_bytes: int) -> None:
    if not data:
        raise InvalidInput("a secret needs at least one KEY=VALUE")
    if len(data) > MAX_KEYS:
        raise InvalidInput(f"a secret may hold at most {MAX_KEYS} keys")
    total = 0
    for key, value in data.items():
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidInput(f"secret keys must be 1..{MAX_KEY_CHARS} characters")
        total += len(key.encode()) + len(value.encode())
    if total > max_bytes:
        raise InvalidInput(f"the secret's keys and values exceed {max_bytes} bytes")


def check_policy_name(name: str) -> str:
    if not name or len(name) > MAX_POLICY_NAME_CHARS or not _NAME.fullmatch(name):
        raise InvalidInput(f"policy names are 1..{MAX_POLICY_NAME_CHARS} letters, digits, "
                           "'.', '_' or '-'")
    return name


def check_page_size(page_size: int) -> int:
    """The page size to use: 0 is the default, anything above the maximum the maximum."""
    if page_size < 0:
        raise InvalidInput(f"page_size must be 0 (default {DEFAULT_PAGE_SIZE}) or positive")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def check_versions(versions: list[int]) -> list[int]:
    for v in versions:
        if v <= 0:
            raise InvalidInput("versions are positive integers")
    return versions

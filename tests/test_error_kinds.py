"""Every kind of error Nexus names (spike.errors.ErrorKind) has one documented exit code.

Nexus's errors carry ErrorKind members; Pilot answers each kind from one table
(pilot.errors.KIND_ANSWERS); every exit code Pilot gives is in README's "Exit codes".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from nexus.core import errors
from pilot.client import translate
from pilot.errors import EXIT_ROTATION_FAILED, KIND_ANSWERS, AuditTailTorn, PilotError
from spike.errors import ERROR_KIND_KEY, ErrorKind


class FakeRpcError(grpc.RpcError):
    """What a stub raises: a status code, its details and the kind in the trailers."""

    def __init__(self, code: grpc.StatusCode, detail: str, kind: str) -> None:
        self._code, self._detail, self._kind = code, detail, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._detail

    def trailing_metadata(self) -> Any:  # pairs, as grpcio gives them (the stubs say otherwise)
        return ((ERROR_KIND_KEY, self._kind),)


# The exit code of every kind Nexus names (README, "Exit codes"). A kind added to ErrorKind
# without an answer in pilot.errors.KIND_ANSWERS, or without a line here, fails.
EXPECTED_EXIT = {
    ErrorKind.ERROR: 1,
    ErrorKind.INTERNAL: 1,
    ErrorKind.UNAVAILABLE: 1,
    ErrorKind.INTEGRITY: 1,
    ErrorKind.METADATA_INTEGRITY: 1,
    ErrorKind.INVALID_ARGUMENT: 2,
    ErrorKind.PASSWORD_REJECTED: 2,
    ErrorKind.PERMISSION_DENIED: 4,
    ErrorKind.UNAUTHENTICATED: 4,
    ErrorKind.UNINITIALIZED: 5,
    ErrorKind.SEALED: 5,
    ErrorKind.STALE: 5,
    ErrorKind.STORE: 5,
    ErrorKind.NOT_FOUND: 6,
    ErrorKind.CONFLICT: 7,
    ErrorKind.WRONG_PASSWORD: 8,
    ErrorKind.BACKUP_INVALID: 8,
    ErrorKind.OLD_PASSWORD_BACKUP: 8,
    ErrorKind.BACKOFF: 9,
    ErrorKind.ALREADY_INITIALIZED: 10,
    ErrorKind.ALREADY_UNSEALED: 10,
}


def _documented_exit_codes() -> set[int]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("Exit codes:"):]
    section = section[:section.index("\n\n")]
    return {int(n) for n in re.findall(r"(?<![\w.-])(\d+) [A-Za-z]", section)}


@pytest.mark.parametrize("kind", list(ErrorKind), ids=str)
def test_every_error_kind_has_its_documented_exit_code(kind: ErrorKind) -> None:
    assert set(EXPECTED_EXIT) == set(ErrorKind) == set(KIND_ANSWERS)
    assert EXPECTED_EXIT[kind] in _documented_exit_codes()
    for code in grpc.StatusCode:  # the kind decides, whatever the status code
        for detail in ("", "what went wrong"):
            err = translate(FakeRpcError(code, detail, kind.value), "x")
            assert err.exit_code == EXPECTED_EXIT[kind], (code, detail)
            assert str(err).strip()


def test_every_exit_code_pilot_gives_is_documented() -> None:
    def classes(cls: type[PilotError]) -> list[type[PilotError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in classes(sub))]

    codes = {cls.exit_code for cls in classes(PilotError)} | {EXIT_ROTATION_FAILED}
    assert AuditTailTorn.exit_code == 12 and EXIT_ROTATION_FAILED == 11
    assert codes <= _documented_exit_codes(), codes - _documented_exit_codes()


def test_nexus_errors_carry_error_kinds() -> None:
    def classes(cls: type[errors.NexusError]) -> list[type[errors.NexusError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in classes(sub))]

    for cls in classes(errors.NexusError):
        assert isinstance(cls.kind, ErrorKind), cls
    assert errors.NotReady(ErrorKind.STORE, "not writable").kind is ErrorKind.STORE
    with pytest.raises(ValueError):
        errors.NotReady("no-such-kind", "x")  # type: ignore[arg-type]

"""Argon2id password hashing into protected memory.

Defaults follow RFC 9106 section 4, second recommended option (t=3, m=64 MiB, p=4, 16-byte
salt). :meth:`KdfParams.validate` refuses anything below the OWASP minimum (m=19 MiB, t=2) and
anything above sanity bounds (m <= 4 GiB, t <= 64, p <= 64), so a hostile backup file can neither
weaken the KDF nor make us allocate unbounded memory. Tests need cheap parameters: they must ask
for them by name with :meth:`KdfParams.insecure_for_tests`.

Those sanity bounds are not enough for a backup that arrives over the network (``spike recover
--backup-file``): 4 GiB and t=64 would still cost gigabytes and many seconds. :class:`KdfBound`
bounds what a Nexus accepts *relative to its own configured parameters* (see
:meth:`KdfBound.for_configured`), and is checked before Argon2 runs.

The hash is computed with argon2-cffi's ``core`` binding (the reference ``argon2_ctx``) rather
than ``hash_secret_raw`` so that the password is read straight from the caller's ``bytearray``
and the output is written straight into a :class:`SecretBuffer`: no immutable ``bytes`` copies.
The known-answer tests pin this against RFC 9106 and against ``hash_secret_raw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _argon2_cffi_bindings import ffi, lib
from argon2.low_level import ARGON2_VERSION, Type, core, error_to_str

from nexus.crypto.secret_buffer import SecretBuffer

__all__ = [
    "MAX_MEMORY_KIB",
    "MAX_PARALLELISM",
    "MAX_TIME_COST",
    "OWASP_MIN_MEMORY_KIB",
    "OWASP_MIN_TIME_COST",
    "KdfBound",
    "KdfError",
    "KdfParams",
    "derive",
]

OWASP_MIN_MEMORY_KIB = 19456
OWASP_MIN_TIME_COST = 2
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_TIME_COST = 64
MAX_PARALLELISM = 64
MIN_SALT_LEN = 16
MAX_SALT_LEN = 64
MIN_OUT_LEN = 16
MAX_OUT_LEN = 1024


# What a Nexus accepts from a backup, relative to its configured parameters: up to
# RELATIVE_FACTOR times each configured cost, but never less than the floors (so a backup made
# under an earlier, somewhat stronger configuration still opens) and never more than the
# absolute caps. The work (memory x passes) is bounded the same way, so that neither a huge
# memory nor many passes over a large memory can hold the lifecycle lock for long.
RELATIVE_FACTOR = 4
FLOOR_MEMORY_KIB = 1024 * 1024  # 1 GiB
FLOOR_TIME_COST = 8
FLOOR_PARALLELISM = 16
FLOOR_WORK_KIB = FLOOR_MEMORY_KIB * 3  # 1 GiB x 3 passes: the RFC 9106 first option, scaled


class KdfError(Exception):
    """Argon2 reported an error (message is the library's error name, never input data)."""


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters. ``memory_kib`` is in KiB (argon2's ``m``)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4
    salt_len: int = 16
    out_len: int = 96
    insecure_for_tests_only: bool = False
    """Set only by :meth:`insecure_for_tests`; lets :meth:`validate` accept sub-OWASP costs."""

    @classmethod
    def insecure_for_tests(
        cls, time_cost: int = 1, memory_kib: int = 64, parallelism: int = 1
    ) -> KdfParams:
        """Cheap parameters for unit tests; refused by :meth:`require_production`."""
        return cls(
            time_cost=time_cost,
            memory_kib=memory_kib,
            parallelism=parallelism,
            insecure_for_tests_only=True,
        )

    @property
    def meets_owasp_minimum(self) -> bool:
        """True when the costs are at least the OWASP minimum (m=19 MiB, t=2)."""
        return (
            self.memory_kib >= OWASP_MIN_MEMORY_KIB and self.time_cost >= OWASP_MIN_TIME_COST
        )

    def validate(self) -> None:
        """Raise ``ValueError`` unless these parameters are safe to use (see module docstring)."""
        for name in ("time_cost", "memory_kib", "parallelism", "salt_len", "out_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"KDF {name} must be an int")
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise ValueError(f"KDF parallelism must be in 1..{MAX_PARALLELISM}")
        if not 1 <= self.time_cost <= MAX_TIME_COST:
            raise ValueError(f"KDF time cost must be in 1..{MAX_TIME_COST}")
        if not 8 * self.parallelism <= self.memory_kib <= MAX_MEMORY_KIB:
            raise ValueError(f"KDF memory must be in 8*parallelism..{MAX_MEMORY_KIB} KiB")
        if not MIN_SALT_LEN <= self.salt_len <= MAX_SALT_LEN:
            raise ValueError(f"KDF salt length must be in {MIN_SALT_LEN}..{MAX_SALT_LEN}")
        if not MIN_OUT_LEN <= self.out_len <= MAX_OUT_LEN:
            raise ValueError(f"KDF output length must be in {MIN_OUT_LEN}..{MAX_OUT_LEN}")
        if not self.meets_owasp_minimum and not self.insecure_for_tests_only:
            raise ValueError(
                f"KDF parameters below the OWASP minimum (memory >= {OWASP_MIN_MEMORY_KIB} KiB, "
                f"time cost >= {OWASP_MIN_TIME_COST})"
            )

    def require_production(self) -> None:
        """Raise ``ValueError`` for test-only parameters (use in production code paths)."""
        self.validate()
        if self.insecure_for_tests_only:
            raise ValueError("test-only KDF parameters refused in production")


@dataclass(frozen=True)
class KdfBound:
    """The most expensive Argon2id parameters a Nexus accepts from a backup."""

    max_memory_kib: int
    max_time_cost: int
    max_parallelism: int
    max_work_kib: int
    """``memory_kib * time_cost``: the blocks Argon2 fills, which is what its run time tracks."""

    @classmethod
    def for_configured(cls, configured: KdfParams) -> KdfBound:
        """Up to 4x each configured cost, at least the floors, never above the absolute caps.

        With the defaults (m=64 MiB, t=3, p=4): memory <= 1 GiB, t <= 12, p <= 16 and
        memory x t <= 3 GiB (so 1 GiB with t <= 3, or 256 MiB with t <= 12).
        """
        return cls(
            max_memory_kib=min(MAX_MEMORY_KIB,
                               max(RELATIVE_FACTOR * configured.memory_kib, FLOOR_MEMORY_KIB)),
            max_time_cost=min(MAX_TIME_COST,
                              max(RELATIVE_FACTOR * configured.time_cost, FLOOR_TIME_COST)),
            max_parallelism=min(MAX_PARALLELISM,
                                max(RELATIVE_FACTOR * configured.parallelism,
                                    FLOOR_PARALLELISM)),
            max_work_kib=max(RELATIVE_FACTOR * configured.memory_kib * configured.time_cost,
                             FLOOR_WORK_KIB),
        )

    def check(self, params: KdfParams) -> None:
        """Raise ``ValueError`` (naming the bound, never a secret) when ``params`` exceed it."""
        if params.memory_kib > self.max_memory_kib:
            raise ValueError(f"KDF memory {params.memory_kib} KiB is above this Nexus's bound "
                             f"of {self.max_memory_kib} KiB")
        if params.time_cost > self.max_time_cost:
            raise ValueError(f"KDF time cost {params.time_cost} is above this Nexus's bound "
                             f"of {self.max_time_cost}")
        if params.parallelism > self.max_parallelism:
            raise ValueError(f"KDF parallelism {params.parallelism} is above this Nexus's "
                             f"bound of {self.max_parallelism}")
        if params.memory_kib * params.time_cost > self.max_work_kib:
            raise ValueError(f"KDF work (memory x time cost = "
                             f"{params.memory_kib * params.time_cost} KiB) is above this "
                             f"Nexus's bound of {self.max_work_kib} KiB")


def _argon2id_into(
    out: SecretBuffer,
    password: bytearray | bytes,
    salt: bytes,
    *,
    time_cost: int,
    memory_kib: int,
    parallelism: int,
    secret: bytes | None = None,
    associated_data: bytes | None = None,
) -> None:
    """Run Argon2id (v1.3) writing ``len(out)`` bytes into ``out``. No policy checks."""
    keep: list[Any] = []

    def buf(data: bytes | bytearray | None) -> Any:
        if not data:
            return ffi.NULL
        c = ffi.from_buffer("uint8_t[]", data)
        keep.append(c)
        return c

    with out.writable_view() as target:
        cout = ffi.from_buffer("uint8_t[]", target, require_writable=True)
        try:
            ctx = ffi.new(
                "argon2_context *",
                {
                    "out": cout,
                    "outlen": len(target),
                    "pwd": buf(password),
                    "pwdlen": len(password),
                    "salt": buf(salt),
                    "saltlen": len(salt),
                    "secret": buf(secret),
                    "secretlen": len(secret or b""),
                    "ad": buf(associated_data),
                    "adlen": len(associated_data or b""),
                    "t_cost": time_cost,
                    "m_cost": memory_kib,
                    "lanes": parallelism,
                    "threads": parallelism,
                    "version": ARGON2_VERSION,
                    "allocate_cbk": ffi.NULL,
                    "free_cbk": ffi.NULL,
                    "flags": lib.ARGON2_DEFAULT_FLAGS,
                },
            )
            rc = core(ctx, Type.ID.value)
        finally:
            ffi.release(cout)
            for c in keep:
                ffi.release(c)
    if rc != lib.ARGON2_OK:
        raise KdfError(f"argon2id failed: {error_to_str(rc)}")


def derive(password: bytearray, salt: bytes, params: KdfParams) -> SecretBuffer:
    """Argon2id(``password``, ``salt``) -> ``params.out_len`` bytes in a :class:`SecretBuffer`.

    ``params`` are validated first (``ValueError``). The caller keeps ownership of ``password``
    and should wipe it (``wipe_bytearray``) when done; it is read in place, never copied here.
    """
    params.validate()
    if not isinstance(password, bytearray):
        raise TypeError("password must be a bytearray (so that it can be wiped)")
    if len(salt) != params.salt_len:
        raise ValueError("salt length does not match the KDF parameters")
    out = SecretBuffer(params.out_len)
    try:
        _argon2id_into(
            out,
            password,
            salt,
            time_cost=params.time_cost,
            memory_kib=params.memory_kib,
            parallelism=params.parallelism,
        )
    except BaseException:
        out.wipe()
        raise
    return out

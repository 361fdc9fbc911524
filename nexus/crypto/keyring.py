"""The keyring: an immutable value mapping root key generations to their keys.

Changes (:meth:`Keyring.with_key`, :meth:`Keyring.without`, :meth:`Keyring.with_active`) return a
new keyring and never modify the receiver, so a manager can build the next keyring aside and swap
one reference under a lock: readers never see a half-built keyring.

Removing a generation does not wipe it, because readers holding the previous keyring value may
still be decrypting with it. The owner wipes the removed entry after the swap::

    removed = current.entry(g)
    new = current.without(g)
    swap(new)
    removed.wipe()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

from nexus.crypto import envelope
from nexus.crypto.envelope import DecryptionError
from nexus.crypto.keys import ENCRYPTION_PURPOSES, AeadKey, Purpose, fingerprint
from nexus.crypto.secret_buffer import SecretKey

__all__ = ["Keyring", "KeyringEntry", "UnknownGeneration"]


class UnknownGeneration(KeyError):
    """The keyring holds no key for the requested generation."""

    def __init__(self, generation: int) -> None:
        super().__init__(generation)
        self.generation = generation

    def __str__(self) -> str:
        return f"no root key for generation {self.generation}"


@dataclass(frozen=True, repr=False, eq=False)
class KeyringEntry:
    """One root key generation: the key, its fingerprint and its per-purpose AEAD keys."""

    generation: int
    key: SecretKey
    fingerprint: bytes
    _aeads: Mapping[Purpose, AeadKey] = field(default_factory=dict)

    @classmethod
    def create(cls, generation: int, key: SecretKey) -> KeyringEntry:
        """Derive the fingerprint and AEAD sub-keys of ``key`` (the entry takes ownership)."""
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise ValueError("generation must be an int")
        if not 1 <= generation <= envelope.MAX_GENERATION:
            raise ValueError("generation must be in 1 .. 2**32-1")
        if key.wiped:
            raise ValueError("key has been wiped")
        aeads = {purpose: AeadKey(key, purpose) for purpose in ENCRYPTION_PURPOSES}
        return cls(generation, key, fingerprint(key), MappingProxyType(aeads))

    def aead(self, purpose: Purpose) -> AeadKey:
        """The AEAD key for ``purpose`` (``ValueError`` for the fingerprint purpose)."""
        try:
            return self._aeads[purpose]
        except KeyError:
            raise ValueError(f"no encryption key for purpose {purpose.name}") from None

    @property
    def fingerprint_hex(self) -> str:
        """Hex form of the fingerprint."""
        return self.fingerprint.hex()

    @property
    def locked(self) -> bool:
        """True when the root key's memory is mlocked."""
        return self.key.locked

    def wipe(self) -> None:
        """Drop cached ciphers and zero the root key and sub-keys. Idempotent."""
        for aead in self._aeads.values():
            aead.wipe()
        self.key.wipe()

    def __repr__(self) -> str:
        return f"<KeyringEntry generation={self.generation} fingerprint={self.fingerprint_hex}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyringEntry cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("KeyringEntry cannot be pickled")


class Keyring:
    """Immutable mapping generation -> :class:`KeyringEntry`, with one active generation.

    New records are encrypted with the active generation; a record is decrypted with the
    generation named in its envelope header.
    """

    __slots__ = ("_active", "_entries")

    def __init__(
        self, entries: Mapping[int, KeyringEntry] | None = None, active: int | None = None
    ) -> None:
        entries = dict(entries or {})
        for generation, entry in entries.items():
            if entry.generation != generation:
                raise ValueError("keyring entry filed under the wrong generation")
        if active is not None and active not in entries:
            raise ValueError("the active generation must be in the keyring")
        if active is None and entries:
            raise ValueError("a non-empty keyring needs an active generation")
        self._entries: Mapping[int, KeyringEntry] = MappingProxyType(entries)
        self._active = active

    @classmethod
    def empty(cls) -> Keyring:
        """A keyring with no keys (the sealed state)."""
        return cls()

    @classmethod
    def from_keys(cls, keys: Mapping[int, SecretKey], active: int | None = None) -> Keyring:
        """Build a keyring from recovered keys; ``active`` defaults to the highest generation."""
        if not keys:
            return cls()
        entries = {g: KeyringEntry.create(g, k) for g, k in keys.items()}
        return cls(entries, max(entries) if active is None else active)

    # -- reading ---------------------------------------------------------------------------

    @property
    def active_generation(self) -> int | None:
        """The generation new records are encrypted with (``None`` when empty)."""
        return self._active

    @property
    def generations(self) -> tuple[int, ...]:
        """All generations held, ascending."""
        return tuple(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, generation: object) -> bool:
        return generation in self._entries

    def __iter__(self) -> Iterator[int]:
        return iter(self.generations)

    def entry(self, generation: int) -> KeyringEntry:
        """The entry for ``generation`` (:class:`UnknownGeneration` if absent)."""
        try:
            return self._entries[generation]
        except KeyError:
            raise UnknownGeneration(generation) from None

    def key_for(self, generation: int) -> SecretKey:
        """The root key of ``generation`` (:class:`UnknownGeneration` if absent)."""
        return self.entry(generation).key

    def fingerprint_for(self, generation: int) -> bytes:
        """The fingerprint of ``generation`` (:class:`UnknownGeneration` if absent)."""
        return self.entry(generation).fingerprint

    def fingerprints(self) -> dict[int, bytes]:
        """Generation -> fingerprint for every key held."""
        return {g: e.fingerprint for g, e in sorted(self._entries.items())}

    def keys(self) -> dict[int, SecretKey]:
        """Generation -> root key, e.g. to reseal the backup."""
        return {g: e.key for g, e in sorted(self._entries.items())}

    @property
    def all_locked(self) -> bool:
        """True when every root key's memory is mlocked."""
        return all(e.locked for e in self._entries.values())

    # -- changing (returns a new keyring) -------------------------------------------------------

    def with_key(self, generation: int, key: SecretKey, *, activate: bool = True) -> Keyring:
        """Return a keyring that also holds ``key`` as ``generation`` (active by default).

        Refuses (``ValueError``) a generation already present.
        """
        if generation in self._entries:
            raise ValueError(f"generation {generation} is already in the keyring")
        entries = dict(self._entries)
        entries[generation] = KeyringEntry.create(generation, key)
        active = generation if activate or self._active is None else self._active
        return Keyring(entries, active)

    def with_active(self, generation: int) -> Keyring:
        """Return a keyring whose active generation is ``generation`` (which must be held)."""
        self.entry(generation)
        return Keyring(self._entries, generation)

    def without(self, generation: int) -> Keyring:
        """Return a keyring without ``generation``. Refuses to remove the active generation.

        The removed key is not wiped (see the module docstring).
        """
        self.entry(generation)
        if generation == self._active:
            raise ValueError("cannot remove the active generation")
        entries = {g: e for g, e in self._entries.items() if g != generation}
        return Keyring(entries, self._active)

    # -- using --------------------------------------------------------------------------------

    def encrypt(self, purpose: Purpose, plaintext: bytes, identity: bytes) -> bytes:
        """Encrypt with the active generation's key for ``purpose``."""
        if self._active is None:
            raise ValueError("the keyring is empty")
        entry = self._entries[self._active]
        return envelope.encrypt(entry.aead(purpose), entry.generation, plaintext, identity)

    def decrypt(self, purpose: Purpose, blob: bytes, identity: bytes) -> bytes:
        """Decrypt with the generation the header names (:class:`DecryptionError` if absent)."""
        generation = envelope.peek_generation(blob)
        entry = self._entries.get(generation)
        if entry is None:
            raise DecryptionError()
        return envelope.decrypt(
            entry.aead(purpose), blob, identity, expected_generation=generation
        )

    def wipe(self) -> None:
        """Wipe every key held (use when sealing; the keyring is unusable afterwards)."""
        for entry in self._entries.values():
            entry.wipe()

    def __repr__(self) -> str:
        return f"<Keyring generations={list(self.generations)} active={self._active}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Keyring cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("Keyring cannot be pickled")

"""Best-effort protected memory for key material.

A :class:`SecretBuffer` owns an anonymous ``mmap`` that is ``mlock``-ed (kept out of swap) and
marked ``MADV_DONTDUMP`` (kept out of core dumps) where the OS allows it, zeroed on :meth:`wipe`,
never shown in ``repr`` and never pickled.

Honest limits: this is best effort. Python, OpenSSL and argon2 keep copies we cannot reach
(objects built by the library call copies documented at :meth:`SecretBuffer.bytes_for_call`,
cipher contexts, the stack of C functions). What this module guarantees is that *our* long-lived
copy of a key sits in locked, non-dumpable memory and is zeroed when we are done with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from types import TracebackType
from typing import NoReturn

from spike.memory import wipe_bytearray

__all__ = [
    "ROOT_KEY_SIZE",
    "SecretBuffer",
    "SecretKey",
    "live_buffer_counts",
]

ROOT_KEY_SIZE = 32

_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_libc_loaded = False

# Every live buffer, so the process can report how much key memory is (not) locked.
_live: weakref.WeakSet[SecretBuffer] = weakref.WeakSet()
_live_lock = threading.Lock()


def _load_libc() -> ctypes.CDLL | None:
    global _libc, _libc_loaded
    with _libc_lock:
        if not _libc_loaded:
            _libc_loaded = True
            try:
                name = ctypes.util.find_library("c")
                _libc = ctypes.CDLL(name, use_errno=True) if name else None
            except OSError:
                _libc = None
        return _libc


def _mlock(address: int, size: int) -> bool:
    libc = _load_libc()
    if libc is None or not hasattr(libc, "mlock"):
        return False
    try:
        rc = libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size))
    except (OSError, AttributeError):
        return False
    return bool(rc == 0)


def _munlock(address: int, size: int) -> None:
    libc = _load_libc()
    if libc is None or not hasattr(libc, "munlock"):
        return
    with suppress(OSError, AttributeError):
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(size))


def _address_of(mapping: mmap.mmap) -> int:
    # The ctypes view exports the buffer; drop it at once so the mapping can be closed later.
    view = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _fill_random(buf: SecretBuffer) -> None:
    """Fill ``buf`` from the OS CSPRNG, in place when libc ``getrandom`` is available."""
    libc = _load_libc()
    getrandom = getattr(libc, "getrandom", None) if libc is not None else None
    if getrandom is not None:
        with buf.writable_view() as target:
            address = _address_of_view(target)
            filled = 0
            while filled < len(target):
                n = getrandom(
                    ctypes.c_void_p(address + filled), ctypes.c_size_t(len(target) - filled), 0
                )
                if n <= 0:
                    break
                filled += n
            if filled == len(target):
                return
    # Fallback: os.urandom returns immutable bytes, an unavoidable short-lived copy.
    random = bytearray(os.urandom(buf.size))
    try:
        with buf.writable_view() as target:
            target[:] = random
    finally:
        wipe_bytearray(random)


def _address_of_view(view: memoryview) -> int:
    holder = (ctypes.c_char * len(view)).from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def live_buffer_counts() -> tuple[int, int]:
    """Return ``(live, locked)``: how many un-wiped secret buffers exist, how many mlocked."""
    with _live_lock:
        buffers = list(_live)
    live = [b for b in buffers if not b.wiped]
    return len(live), sum(1 for b in live if b.locked)


class SecretBuffer:
    """A fixed-size mutable buffer for key material in locked, non-dumpable memory.

    Create it empty (zeroed) with ``SecretBuffer(size)`` and fill it through :meth:`writable_view`,
    or take over a ``bytearray`` with :meth:`from_bytes_consuming`. Read it through :meth:`view`
    (no copy) or :meth:`bytes_for_call` (one short-lived copy for APIs that insist on ``bytes``).
    ``wipe()`` zeroes and unmaps it; it is idempotent and also runs on context-manager exit and at
    garbage collection.
    """

    __slots__ = ("__weakref__", "_address", "_lock", "_locked", "_map", "_size", "_views")

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError("SecretBuffer size must be a positive integer")
        self._size = size
        self._lock = threading.Lock()
        self._views = 0
        self._map: mmap.mmap | None = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self._address = _address_of(self._map)
        self._locked = _mlock(self._address, size)
        madv = getattr(mmap, "MADV_DONTDUMP", None)
        if madv is not None:
            with suppress(OSError):
                self._map.madvise(madv)
        with _live_lock:
            _live.add(self)

    @classmethod
    def from_bytes_consuming(cls, source: bytearray) -> SecretBuffer:
        """Copy ``source`` into a new buffer and zero ``source``, even if the copy fails."""
        if not isinstance(source, bytearray):
            raise TypeError("from_bytes_consuming needs a bytearray (it zeroes the source)")
        try:
            buf = cls(len(source))
            with buf.writable_view() as target:
                target[:] = source
            return buf
        finally:
            wipe_bytearray(source)

    @property
    def size(self) -> int:
        """Number of bytes held."""
        return self._size

    @property
    def locked(self) -> bool:
        """True when ``mlock`` succeeded (the pages cannot be swapped out)."""
        return self._locked and self._map is not None

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` has run."""
        return self._map is None

    def __len__(self) -> int:
        return self._size

    def _require(self) -> mmap.mmap:
        mapping = self._map
        if mapping is None:
            raise ValueError("secret buffer has been wiped")
        return mapping

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """Yield a read-only ``memoryview`` of the secret, released when the block exits.

        No copy is made. Do not keep the view (or slices of it) beyond the ``with`` block.
        """
        with self._lock:
            mapping = self._require()
            self._views += 1
        full = memoryview(mapping)
        view = full.toreadonly()
        try:
            yield view
        finally:
            view.release()
            full.release()
            with self._lock:
                self._views -= 1

    @contextmanager
    def writable_view(self) -> Iterator[memoryview]:
        """Yield a writable ``memoryview`` of the buffer, for filling it in place."""
        with self._lock:
            mapping = self._require()
            self._views += 1
        view = memoryview(mapping)
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                self._views -= 1

    def bytes_for_call(self) -> bytes:
        """Return an immutable copy of the secret for a library call that only accepts ``bytes``.

        This is the one unavoidable copy: ``bytes`` cannot be wiped, so use it for the duration
        of a single call and drop the reference. Prefer :meth:`view` wherever a buffer works.
        """
        with self._lock:
            return bytes(self._require())

    def wipe(self) -> None:
        """Zero the buffer, unlock and unmap it. Safe to call more than once."""
        with self._lock:
            mapping = self._map
            if mapping is None:
                return
            ctypes.memset(self._address, 0, self._size)
            if self._locked:
                _munlock(self._address, self._size)
            self._map = None
            # If a view is still exported, close() fails: the pages are already zeroed and
            # the mapping is unmapped when the last view goes away.
            with suppress(BufferError):
                mapping.close()

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        # Best effort: this can run at interpreter shutdown.
        with suppress(Exception):
            self.wipe()

    def __repr__(self) -> str:
        state = "wiped" if self.wiped else ("locked" if self._locked else "unlocked")
        return f"<SecretBuffer size={self._size} {state} [REDACTED]>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBuffer cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("SecretBuffer cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretBuffer cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SecretBuffer cannot be copied")


class SecretKey:
    """A 32-byte root key held in a :class:`SecretBuffer`.

    Obtain one with :meth:`generate` (OS CSPRNG) or :meth:`from_bytes_consuming` (recovery).
    The key owns its buffer; :meth:`wipe` zeroes it.
    """

    __slots__ = ("_buffer",)

    def __init__(self, buffer: SecretBuffer) -> None:
        """Take ownership of ``buffer`` (which must hold exactly 32 bytes)."""
        if not isinstance(buffer, SecretBuffer):
            raise TypeError("SecretKey needs a SecretBuffer")
        if buffer.size != ROOT_KEY_SIZE:
            raise ValueError(f"a root key is {ROOT_KEY_SIZE} bytes")
        self._buffer = buffer

    @classmethod
    def generate(cls) -> SecretKey:
        """Generate a fresh key from the OS CSPRNG, written straight into protected memory."""
        buf = SecretBuffer(ROOT_KEY_SIZE)
        try:
            _fill_random(buf)
        except BaseException:
            buf.wipe()
            raise
        return cls(buf)

    @classmethod
    def from_bytes_consuming(cls, source: bytearray) -> SecretKey:
        """Build a key from ``source`` (32 bytes) and zero ``source``."""
        if not isinstance(source, bytearray):
            raise TypeError("from_bytes_consuming needs a bytearray (it zeroes the source)")
        if len(source) != ROOT_KEY_SIZE:
            wipe_bytearray(source)
            raise ValueError(f"a root key is {ROOT_KEY_SIZE} bytes")
        return cls(SecretBuffer.from_bytes_consuming(source))

    @property
    def buffer(self) -> SecretBuffer:
        """The protected buffer holding the key."""
        return self._buffer

    @property
    def locked(self) -> bool:
        """True when the key's memory is mlocked."""
        return self._buffer.locked

    @property
    def wiped(self) -> bool:
        """True once the key has been wiped."""
        return self._buffer.wiped

    def view(self) -> AbstractContextManager[memoryview]:
        """Read-only view of the key (see :meth:`SecretBuffer.view`)."""
        return self._buffer.view()

    def bytes_for_call(self) -> bytes:
        """Short-lived ``bytes`` copy (see :meth:`SecretBuffer.bytes_for_call`)."""
        return self._buffer.bytes_for_call()

    def wipe(self) -> None:
        """Zero and release the key. Idempotent."""
        self._buffer.wipe()

    def __enter__(self) -> SecretKey:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        state = "wiped" if self.wiped else ("locked" if self.locked else "unlocked")
        return f"<SecretKey {state} [REDACTED]>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretKey cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("SecretKey cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretKey cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SecretKey cannot be copied")


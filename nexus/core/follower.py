"""Keeping a node's keys in step with the keyring of record, for nodes sharing one store.

Another node's rotation records the new generation wrapped under the one before it, and its
finalize retires the old one (:mod:`nexus.core.ledger`). A :class:`KeyringFollower` wakes when
the store announces a change of those records (PostgreSQL LISTEN/NOTIFY) or, at the latest,
every ``interval`` seconds (the fallback when a notification is lost, e.g. while the listening
connection was being re-established), and lets :meth:`KeyManager.follow` catch up. Reads and
writes that meet a generation the node lacks catch up on the spot as well
(:mod:`nexus.core.secrets`), so the follower is what keeps an idle node current.
"""

from __future__ import annotations

import threading

import structlog

from nexus.core import errors
from nexus.core.keymanager import Followed, KeyManager
from nexus.core.ledger import BACKUP_COPY_STATE, ROOT_KEYS_STATE
from nexus.store.base import Store

log = structlog.get_logger("nexus.keys")

FOLLOWED_STATES = frozenset({ROOT_KEYS_STATE, BACKUP_COPY_STATE})
FOLLOW_INTERVAL = 1.0


class KeyringFollower:
    """A daemon thread that runs :meth:`KeyManager.follow` whenever the records change."""

    def __init__(self, keys: KeyManager, store: Store, *,
                 interval: float = FOLLOW_INTERVAL) -> None:
        self._keys = keys
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="keyring-follow")
        self.last: Followed | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop following (returns once the thread has finished its current wait)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.wait_for_state_change(FOLLOWED_STATES, self._interval)
            except Exception:
                log.exception("waiting for keyring changes failed")
                self._stop.wait(self._interval)
            if self._stop.is_set():
                return
            self.follow_once()

    def follow_once(self) -> Followed | None:
        """One catch-up (a sealed node has nothing to follow: None)."""
        if not self._keys.is_unsealed():
            return None
        try:
            self.last = self._keys.follow()
        except errors.NotReady:
            return None
        except Exception:
            # The loop outlives any error (a lost database comes back): log, go on.
            log.exception("following the keyring of record failed")
            return None
        return self.last

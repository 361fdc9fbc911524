"""The nodes sharing a store: each one's heartbeat row, and what the others can read from it.

Every node writes ``node/<name>`` (a state document) when it starts, whenever its keys change,
``stopped`` when it shuts down and, on a store shared with other nodes, every
``HEARTBEAT_INTERVAL`` seconds:
its address (``--advertise-address``), lifecycle state, active generation, the generations it
holds and when it last reported. A node silent for longer than the lease (``NODE_LEASE``,
``--node-lease-seconds``) counts as gone.
``spike status`` lists them; the rows are facts a node states about itself, never keys.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from nexus import __version__
from nexus.core.keymanager import KeyManager
from nexus.store.base import Store

log = structlog.get_logger("nexus.cluster")

NODE_STATE_PREFIX = "node/"
HEARTBEAT_INTERVAL = 2.0
NODE_LEASE = 10.0
STOPPED = "stopped"


@dataclass(frozen=True)
class NodeRecord:
    """One node's last report about itself."""

    name: str
    address: str
    state: str
    generation: int
    generations: tuple[int, ...]
    last_seen: float
    version: str = ""

    def live(self, now: float, lease: float = NODE_LEASE) -> bool:
        """Reported within the lease and not stopped."""
        return self.state != STOPPED and now - self.last_seen <= lease

    @classmethod
    def parse(cls, raw: str) -> NodeRecord | None:
        try:
            doc = json.loads(raw)
            return cls(str(doc["name"]), str(doc["address"]), str(doc["state"]),
                       int(doc["generation"]), tuple(int(g) for g in doc["generations"]),
                       float(doc["last_seen"]), str(doc.get("version", "")))
        except (KeyError, TypeError, ValueError):
            return None


class NodeRegistry:
    """This node's heartbeat (a daemon thread) and the list of every node's last report."""

    def __init__(self, store: Store, keys: KeyManager, *, name: str, address: str = "",
                 clock: Callable[[], float] = time.time,
                 interval: float | None = HEARTBEAT_INTERVAL,
                 lease: float = NODE_LEASE) -> None:
        """``interval`` None: no periodic beats (a store no other node reads: SQLite)."""
        self._store = store
        self._keys = keys
        self.name = name
        self.address = address
        self.lease = lease
        self._clock = clock
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-heartbeat")

    def start(self) -> None:
        if self._interval is None:
            self.report()
        else:
            self._thread.start()

    def stop(self) -> None:
        """Stop beating and report ``stopped`` (the others need not wait out the lease)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=(self._interval or 0.0) + 5.0)
        self.report(STOPPED)

    def mine(self, state: str = "") -> NodeRecord:
        keyring = self._keys.keyring
        return NodeRecord(self.name, self.address, state or str(self._keys.state),
                          keyring.active_generation or 0, keyring.generations, self._clock(),
                          __version__)

    def beat(self, state: str = "") -> None:
        """Write this node's row now."""
        record = asdict(self.mine(state))
        self._store.put_state(NODE_STATE_PREFIX + self.name,
                              json.dumps(record, sort_keys=True))

    def report(self, state: str = "") -> None:
        """:meth:`beat`, logging a failure instead of raising it."""
        try:
            self.beat(state)
        except Exception as exc:  # a lost database comes back: the loop goes on
            log.warning("node heartbeat failed", error_type=type(exc).__name__)

    def _run(self) -> None:
        assert self._interval is not None
        self.report()
        while not self._stop.wait(self._interval):
            self.report()

    def live_peers(self) -> list[NodeRecord]:
        """The other nodes that reported within the lease and are not stopped."""
        now = self._clock()
        return [n for n in self.nodes() if n.name != self.name and n.live(now, self.lease)]

    def nodes(self) -> list[NodeRecord]:
        """Every node's last report, by name (unreadable rows are skipped)."""
        rows = self._store.states_with_prefix(NODE_STATE_PREFIX)
        found = [NodeRecord.parse(raw) for raw in rows.values()]
        return sorted((r for r in found if r is not None), key=lambda r: r.name)

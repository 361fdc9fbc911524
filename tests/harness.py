"""Helpers shared by the tests: real processes (the dev agent, Nexus, Pilot) and Nexus built
in process (``World``, ``open_keys``) through the same builder as the server (nexus/app.py).

Unix socket paths must stay short, so every directory here lives under a
short /tmp prefix rather than pytest's long tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nexus.app import NexusApp, build, build_keys
from nexus.config import NexusConfig
from nexus.core import testpoints
from nexus.core.keymanager import KeyManager
from nexus.core.rotation import RotationState
from nexus.store import open_store
from nexus.store.base import BlobUpdate, Store, StoreUnavailable
from spike.roles import superuser_id
from spike.tls import DEFAULT_TRUST_DOMAIN

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TEST_PASSWORD = "correct horse battery staple orbit"  # noqa: S105 - a test fixture


def short_tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPIKE_", "SPIFFE_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DevAgent:
    """spike-dev-agent in a subprocess; sockets under ``dir``."""

    def __init__(self, ttl: int = 3600, extra: Sequence[str] = (), ca_dir: Path | None = None):
        self.dir = short_tmpdir("sa-")
        self.ca_dir = ca_dir
        args = [PY, "-m", "devagent", "--dir", str(self.dir), "--ttl", str(ttl), *extra]
        if ca_dir is not None:
            args += ["--ca-dir", str(ca_dir)]
        self.proc = subprocess.Popen(
            args, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.proc.stdout is not None
        # No deadline on a "ready" that did come: a loaded machine (nice -n 19 beside a CPU
        # hog) can take over 20 s to start Python; an agent that dies gives EOF here.
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"dev agent did not start: {line!r} {''.join(self._stderr)}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def socket(self, name: str) -> str:
        return f"unix://{self.dir / (name + '.sock')}"

    def env(self, name: str) -> dict[str, str]:
        env = base_env()
        env["SPIFFE_ENDPOINT_SOCKET"] = self.socket(name)
        return env

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


class Nexus:
    """spike-nexus in a subprocess on 127.0.0.1:0; its stderr is kept for assertions."""

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, str],
        args: Sequence[str] = (),
        wait: bool = True,
        insecure_kdf: bool = True,
        preexec_fn: Any = None,
    ) -> None:
        """``preexec_fn`` runs in the child before exec (e.g. to set resource limits)."""
        self.data_dir = data_dir
        # Cheap Argon2id for tests; benchmarks pass insecure_kdf=False for production costs.
        self.args = [
            PY, "-m", "nexus", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
            *(["--insecure-test-kdf"] if insecure_kdf else []), *args,
        ]
        self.env = dict(env)
        self.lines: list[str] = []
        self.address = ""
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, preexec_fn=preexec_fn,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if wait:
            self.wait_listening()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"nexus listening"' in line:
                self.address = json.loads(line)["address"]
                self._listening.set()

    def wait_listening(self, timeout: float = 180) -> None:  # generous: loaded machines
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nexus did not start:\n" + "".join(self.lines[-30:]))

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)


def pilot(
    args: Sequence[str],
    env: Mapping[str, str],
    nexus: Nexus | str | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `spike ARGS` as a real process."""
    env = dict(env)
    if nexus is not None:
        env["SPIKE_NEXUS_ADDR"] = nexus if isinstance(nexus, str) else nexus.address
    return subprocess.run(
        [PY, "-m", "pilot", *args], env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )


def pilot_json(*args: Any, **kwargs: Any) -> dict[str, Any]:
    result = pilot(*args, **kwargs)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    out: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return out


def start_unsealed(agent: DevAgent, data_dir: Path, args: list[str] | tuple[str, ...] = ()
                   ) -> Nexus:
    """A Nexus on ``data_dir``, initialised with TEST_PASSWORD through Pilot."""
    running = Nexus(data_dir, agent.env("nexus"), args=list(args))
    result = pilot(["init", "--password-stdin"], agent.env("pilot"), running,
                   stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return running


class RestartableNexus:
    """A Nexus on one data directory that a test can stop, tamper with and restart."""

    def __init__(self, agent: DevAgent) -> None:
        self.agent = agent
        self.data_dir = short_tmpdir("nxt-")
        self.nexus = start_unsealed(agent, self.data_dir)

    def restart(self) -> Nexus:
        """Start Nexus again on the same data and recover it from the backup."""
        self.nexus = Nexus(self.data_dir, self.agent.env("nexus"))
        result = pilot(["recover", "--password-stdin"], self.agent.env("pilot"), self.nexus,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        return self.nexus


def put(agent: DevAgent, server: Nexus, path: str, *pairs: str) -> int:
    """`spike secret put`; the new version."""
    out = pilot_json(["secret", "put", path, *pairs, "--output", "json"], agent.env("pilot"),
                     server)
    return int(out["version"])


def get_data(agent: DevAgent, server: Nexus, path: str, version: int = 0) -> dict[str, str]:
    """`spike secret get`; the secret's data."""
    args = ["secret", "get", path, "--output", "json"]
    if version:
        args += ["--version", str(version)]
    return pilot_json(args, agent.env("pilot"), server)["data"]  # type: ignore[no-any-return]


def writer(data_dir: Path) -> sqlite3.Connection:
    """A second writer on a Nexus's SQLite file (autocommit, waits for locks)."""
    conn = sqlite3.connect(data_dir / "spike.db", timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def pem_env(tmp: Path, chain: bytes, key: bytes, bundle: bytes) -> dict[str, str]:
    """An environment that gives Nexus or Pilot its SVID as PEM files written to ``tmp``."""
    (tmp / "c.pem").write_bytes(chain)
    (tmp / "k.pem").write_bytes(key)
    (tmp / "b.pem").write_bytes(bundle)
    env = base_env()
    env.update(SPIKE_SVID_CERT=str(tmp / "c.pem"), SPIKE_SVID_KEY=str(tmp / "k.pem"),
               SPIKE_TRUST_BUNDLE=str(tmp / "b.pem"))
    return env


def audit_events(data_dir: Path) -> list[dict[str, Any]]:
    """The audit trail of the Nexus on ``data_dir`` (a line still being written is left out)."""
    events = []
    for line in (data_dir / "audit.jsonl").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def wait_for_nexus(what: str, check: Callable[[], Any], nexus: Nexus,
                   timeout: float = 300) -> Any:
    """Poll ``check`` until it returns something truthy, and return that (a generous deadline,
    no sleeps that assume how fast anything is); fails with Nexus's last log lines when the
    deadline passes or Nexus exits first."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + "".join(nexus.lines[-40:]))
        if nexus.proc.poll() is not None:
            raise AssertionError(f"Nexus exited waiting for {what}:\n"
                                 + "".join(nexus.lines[-40:]))
        time.sleep(0.02)


def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true, and return that; fails the test
    (naming ``what``) when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- Nexus in process

SUPERUSER = superuser_id(DEFAULT_TRUST_DOMAIN)
# How long a test waits for a state it expects (generous: a loaded machine is slow).
HOLD = 300.0


def nexus_config(directory: Path, **overrides: Any) -> NexusConfig:
    """The configuration of a test Nexus on ``directory``: SQLite, the cheap test KDF, no
    password backoff (tests that exercise it pass ``recover_backoff_seconds``)."""
    config = NexusConfig(data_dir=directory, insecure_test_kdf=True, recover_backoff_seconds=0.0)
    return replace(config, **overrides)


def open_keys(directory: Path, *, backoff: float = 0.0, upgrade: bool = False,
              **overrides: Any) -> KeyManager:
    """A key manager over the SQLite store in ``directory``, built as Nexus builds it;
    ``upgrade`` is --authenticate-legacy-records; ``overrides`` go to ``build_keys``."""
    store = open_store("sqlite", path=directory / "spike.db")
    config = nexus_config(directory, recover_backoff_seconds=backoff,
                          authenticate_legacy_records=upgrade)
    return build_keys(config, store, **overrides)


def state_json(store: Store, key: str) -> Any:
    """The JSON value ``store`` holds under the state ``key`` (which must be set)."""
    raw = store.get_state(key)
    assert raw is not None, key
    return json.loads(raw)


def close_keys(keys: KeyManager) -> None:
    """Seal and close the store, as a stopping Nexus does (one store per SQLite file)."""
    keys.seal()
    keys._store.close()


class RacingStore:
    """The real SQLite store; ``before_replace`` runs right before a batch's conditional update
    (after the engine read and re-encrypted the rows), to stage a racing user write;
    ``fail_count`` makes the next ``count_by_generation`` call fail like a lost database;
    while ``writes_fail`` is set every write fails like a full disk (reads still work)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.before_replace: Callable[[Sequence[BlobUpdate]], None] | None = None
        self.fail_count = False
        self.writes_fail = False

    def _full(self) -> None:
        if self.writes_fail:
            raise StoreUnavailable("sqlite: database or disk is full (injected)")

    def put_state(self, key: str, value: str) -> None:
        self._full()
        self._inner.put_state(key, value)

    def swap_state(self, key: str, expected: str | None, value: str) -> bool:
        self._full()
        return self._inner.swap_state(key, expected, value)

    def count_by_generation(self) -> dict[int, int]:
        if self.fail_count:
            self.fail_count = False
            raise StoreUnavailable("sqlite: disk I/O error (injected)")
        return self._inner.count_by_generation()

    def replace_blobs(self, updates: Sequence[BlobUpdate], *,
                      state: tuple[str, str] | None = None) -> int:
        hook, self.before_replace = self.before_replace, None
        if hook is not None:
            hook(updates)
        self._full()
        return self._inner.replace_blobs(updates, state=state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class World:
    """A Nexus built in process over a real SQLite store (wrapped in ``RacingStore``): key
    manager, counter, audit, secrets, policies and rotation engine in one place."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None, init: bool = True,
                 between: Callable[[], object] | None = None) -> None:
        self.dir = directory
        self.clock = clock
        self.store = RacingStore(open_store("sqlite", path=directory / "spike.db"))
        store: Any = self.store
        # In-process tests do not wait for real: throttling pauses (and any other pause the
        # engine takes) go to ``sleep``, which defaults to returning at once.
        self.app: NexusApp = build(nexus_config(directory), store=store,
                                   clock=clock or time.time, sleep=sleep or (lambda _s: None))
        self.keys = self.app.keys
        self.counter = self.app.counter
        self.audit = self.app.audit
        self.policies = self.app.policies
        self.secrets = self.app.secrets
        self.engine = self.app.rotation
        # ``between`` runs in this engine's worker after every batch (a test point), not in
        # the throttle's pause: that one is skipped when a batch is slower than the rate.
        self._hook: Callable[[str], None] | None = None
        if between is not None:
            def hook(name: str) -> None:
                if name == testpoints.Point.ROTATION_BETWEEN_BATCHES and self.engine.in_worker():
                    between()

            self._hook = hook
            testpoints.add_hook(hook)
        if init:
            self.keys.init(TEST_PASSWORD.encode())

    def close(self) -> None:
        self.engine.shutdown(HOLD)
        if self._hook is not None:
            testpoints.remove_hook(self._hook)
        self.app.close()

    def fill(self, paths: int = 40, versions: int = 2) -> dict[tuple[str, int], dict[str, str]]:
        expected = {}
        for i in range(paths):
            path = f"app/s{i:03d}"
            for v in range(1, versions + 1):
                data = {"k": f"{path} v{v}", "u": "\u00e9\u2603"}
                assert self.secrets.put(SUPERUSER, path, data, None) == v
                expected[(path, v)] = data
        return expected

    def read_all(self, expected: dict[tuple[str, int], dict[str, str]]) -> None:
        for (path, version), data in expected.items():
            assert self.secrets.get(SUPERUSER, path, version).data == data

    def wait(self, timeout: float = HOLD) -> RotationState:
        for _ in self.engine.watch(timeout=0.2):
            pass
        self.engine.join(timeout)  # the worker writes the audit after its terminal state
        state = self.engine.current
        assert state is not None
        return state

    def generations(self) -> dict[str, set[int]]:
        """What rows reference, what memory holds, what the backup (object and file) holds."""
        db = sqlite3.connect(self.dir / "spike.db")
        try:
            rows = {int(g) for (g,) in db.execute(
                "SELECT DISTINCT generation FROM records WHERE blob IS NOT NULL")}
        finally:
            db.close()
        doc = json.loads((self.dir / "root-key.backup").read_text())
        return {
            "rows": rows,
            "memory": set(self.keys.keyring.generations),
            "backup": set(self.keys.backup_generations()),
            "file": {int(g["generation"]) for g in doc["generations"]},
        }


def tamper(directory: Path, path: str, version: int) -> None:
    """Flip the last bit of a secret version's blob in the SQLite file."""
    db = sqlite3.connect(directory / "spike.db")
    try:
        (blob,) = db.execute("SELECT blob FROM records WHERE kind = 'secret' AND path = ? AND "
                             "version = ?", (path, version)).fetchone()
        raw = bytearray(blob)
        raw[-1] ^= 0x01
        db.execute("UPDATE records SET blob = ? WHERE kind = 'secret' AND path = ? AND "
                   "version = ?", (bytes(raw), path, version))
        db.commit()
    finally:
        db.close()

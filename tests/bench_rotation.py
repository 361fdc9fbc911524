"""Benchmark: root key rotation on SQLite next to the raw limit measured in the same run.

    python -m tests.bench_rotation            # 1,000,000 secrets in-process, 100,000 served
    python -m tests.bench_rotation --quick    # 50,000 in-process, 40,000 served (CI, < 3 min)

Part 1, in-process (no gRPC), on one SQLite database populated directly (bulk INSERTs of
secrets sealed by the real keyring under generation 1, ~256-byte JSON plaintexts):

- ``raw limit``: the same rows read in keyset order, AES-GCM decrypted and re-encrypted with
  ``cryptography``'s ``AESGCM`` (fresh nonces, drawn a batch at a time as Nexus draws them;
  same header and associated data layout), written back by a plain ``sqlite3``
  ``executemany`` UPDATE by primary key, one ``BEGIN IMMEDIATE`` transaction per batch,
  same WAL / ``synchronous=FULL`` settings, same batch size. It
  re-encrypts in place under the key that is active, so the data stay valid for the next step.
- ``nexus rotation``: ``RotationEngine.start(emergency=True)`` (unthrottled) to COMPLETED:
  precheck, new key sealed into the backup, re-encrypt (each new ciphertext opened under the
  new key in memory), validate (a count and a cell/header scan in the store), finalize.
  The re-encrypt phase alone is timed from the engine's own events.
- Peak RSS growth during the rotation (VmHWM reset through /proc/self/clear_refs, plus a
  VmRSS sampler), against VmRSS just before the start.

Raw and Nexus passes alternate (raw, nexus, raw, nexus, ...); throughputs are medians over the
rounds and each ratio is the median of the per-round ratios (a raw pass against the rotation
right after it), so noise on this shared machine hits both sides alike.

Part 2, a real Nexus process with real mTLS (dev agent, Pilot): the store is populated the
same fast way while Nexus is stopped (key opened in-process from the backup with the
password), Nexus is restarted and recovered, then one client thread issues ``Get`` calls on a
warm channel to random paths: idle, then during ``spike rotate --detach`` (default throttle),
several rounds. Reports p50/p99 and the p99 ratio (target <= 2).

Prints a table and then one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import platform
import random
import shutil
import sqlite3
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nexus.app import build, build_keys
from nexus.core import rotation as rotation_module
from nexus.core.rotation import RotationEngine, RotationState
from nexus.core.secrets import encode_data
from nexus.crypto.envelope import record_identity
from nexus.crypto.keyring import Keyring
from nexus.crypto.keys import Purpose
from nexus.store import open_store
from nexus.store.base import KIND_SECRET
from spike.states import RotationPhase
from tests.benchkit import target
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, nexus_config, pilot, short_tmpdir

TARGET_THROUGHPUT_RATIO = 0.5
TARGET_RSS_MB = 150.0
TARGET_P99_RATIO = 2.0
POPULATE_CHUNK = 20_000

# --------------------------------------------------------------------------- helpers


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample list."""
    ordered = sorted(samples)
    rank = max(1, round(q / 100.0 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def secret_path(i: int) -> str:
    return f"bench/team{i // 1000:04d}/service-{i:07d}"


def plaintext_for(rng: random.Random, i: int) -> bytes:
    # A realistic secret: a few fields, ~256 bytes of canonical JSON.
    return encode_data({
        "username": f"svc-{i:07d}",
        "password": rng.randbytes(40).hex(),
        "url": f"postgres://db-{i % 97}.internal:5432/app",
        "api_key": rng.randbytes(40).hex(),
    })


def bulk_populate(conn: sqlite3.Connection, keyring: Keyring, n: int,
                  seed: int = 1) -> tuple[int, int]:
    """Insert ``n`` secrets (version 1) sealed by ``keyring``; returns (rows, plaintext bytes).

    Writes the same rows ``SqliteStore.put_secret`` writes (records + secret_meta), in large
    transactions instead of one per secret.
    """
    rng = random.Random(seed)
    now = time.time()
    generation = keyring.active_generation
    plain_bytes = 0
    for start in range(0, n, POPULATE_CHUNK):
        records = []
        metas = []
        for i in range(start, min(n, start + POPULATE_CHUNK)):
            path = secret_path(i)
            plain = plaintext_for(rng, i)
            plain_bytes += len(plain)
            blob = keyring.encrypt(Purpose.SECRETS, plain, record_identity(KIND_SECRET, path, 1))
            records.append((KIND_SECRET, path, 1, generation, blob, now))
            metas.append((path, 1, 1, now, now))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO records (kind, path, version, generation, blob, created_at,"
            " deleted_at, destroyed) VALUES (?, ?, ?, ?, ?, ?, NULL, 0)", records)
        conn.executemany(
            "INSERT INTO secret_meta (path, current_version, oldest_version, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?)", metas)
        conn.execute("COMMIT")
    return n, plain_bytes


def raw_connection(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    assert str(mode).lower() == "wal", mode
    conn.execute("PRAGMA synchronous = FULL")
    return conn


_HEADER = struct.Struct(">BI")
_ID_TAG = b"spike/v1/record-identity"


def raw_pass(conn: sqlite3.Connection, keyring: Keyring, batch: int) -> tuple[int, float]:
    """The raw limit: keyset read + AESGCM decrypt/encrypt + batched UPDATE, no Nexus code.

    Re-encrypts every secret under the active generation's key in place. Returns
    (rows, seconds).
    """
    generation = keyring.active_generation
    assert generation is not None
    aesgcm = keyring.entry(generation).aead(Purpose.SECRETS).aead  # cryptography AESGCM
    kind_b = KIND_SECRET.encode()
    id_prefix = struct.pack(">I", len(_ID_TAG)) + _ID_TAG + struct.pack(">I", len(kind_b)) + kind_b
    pack_len, pack_ver = struct.Struct(">I").pack, struct.Struct(">Q").pack
    urandom = os.urandom
    header_pack = _HEADER.pack
    rows_done = 0
    after = ("", "", -1)
    t0 = time.perf_counter()
    while True:
        rows = conn.execute(
            "SELECT kind, path, version, blob FROM records WHERE blob IS NOT NULL"
            " AND (kind, path, version) > (?, ?, ?) ORDER BY kind, path, version LIMIT ?",
            (*after, batch)).fetchall()
        if not rows:
            break
        params = []
        # A batch's nonces in one getrandom call, as Nexus draws them (envelope.NONCE_POOL).
        nonces = urandom(12 * len(rows))
        for i, (kind, path, version, blob) in enumerate(rows):
            path_b = path.encode()
            identity = id_prefix + pack_len(len(path_b)) + path_b + pack_ver(version)
            view = memoryview(blob)
            plain = aesgcm.decrypt(blob[5:17], view[17:], blob[:17] + identity)
            nonce = nonces[12 * i:12 * i + 12]
            header = header_pack(1, generation) + nonce
            params.append((generation, header + aesgcm.encrypt(nonce, plain, header + identity),
                           kind, path, version))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE records SET generation = ?, blob = ?"
                         " WHERE kind = ? AND path = ? AND version = ?", params)
        conn.execute("COMMIT")
        rows_done += len(rows)
        last = rows[-1]
        after = (last[0], last[1], last[2])
    return rows_done, time.perf_counter() - t0


@dataclass
class NexusRun:
    rows: int
    seconds: float
    reencrypt_seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_growth_mb: float
    events: int
    phases: dict[str, float] = field(default_factory=dict)


class RssSampler:
    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb("VmRSS"))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, proc_status_kb("VmRSS"))


class PhaseMarks:
    """Engine listener: (time, phase, done) of every published state of the current pass."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, str, int]] = []

    def __call__(self, state: RotationState) -> None:
        self.marks.append((time.perf_counter(), state.phase, state.done))


def nexus_pass(engine: RotationEngine, recorder: PhaseMarks, expected_rows: int,
               batch_size: int) -> NexusRun:
    marks: list[tuple[float, str, int]] = []
    recorder.marks = marks
    gc.collect()
    hwm_reset = reset_peak_rss()
    before_kb = proc_status_kb("VmRSS")
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        engine.start(caller="spiffe://bench/rotation", emergency=True, reason="benchmark",
                     batch_size=batch_size)
        last = None
        for state in engine.watch(timeout=5.0):
            last = state
        t1 = time.perf_counter()
    assert last is not None and last.phase == "completed", last
    assert last.reencrypted == expected_rows, (last.reencrypted, expected_rows)
    peak_kb = max(sampler.peak_kb, proc_status_kb("VmHWM") if hwm_reset else 0)
    first_at: dict[str, float] = {}
    for at, phase, _ in marks:
        first_at.setdefault(phase, at)
    reencrypt = first_at.get(RotationPhase.VALIDATE, t1) - first_at.get(RotationPhase.REENCRYPT, t0)
    phases: dict[str, float] = {}
    order = [p for p in ("precheck", "new_key", "reencrypt", "validate", "finalize",
                         "completed") if p in first_at]
    for a, b in itertools.pairwise(order):
        phases[a] = round(first_at[b] - first_at[a], 4)
    return NexusRun(
        rows=last.reencrypted, seconds=t1 - t0, reencrypt_seconds=reencrypt,
        rss_before_mb=before_kb / 1024, rss_peak_mb=peak_kb / 1024,
        rss_growth_mb=max(0, peak_kb - before_kb) / 1024, events=len(marks), phases=phases)


def rates_for(runs: list[NexusRun], raw_rates: list[float], batch: int) -> dict[str, Any]:
    """Medians over the rounds; each ratio is the median of the per-round ratios (a raw
    pass and the Nexus rotation right after it see the same machine conditions)."""
    raw = statistics.median(raw_rates)
    e2e = statistics.median(r.rows / r.seconds for r in runs)
    reenc = statistics.median(r.rows / r.reencrypt_seconds for r in runs)
    e2e_ratios = [r.rows / r.seconds / x for r, x in zip(runs, raw_rates, strict=True)]
    reenc_ratios = [r.rows / r.reencrypt_seconds / x
                    for r, x in zip(runs, raw_rates, strict=True)]
    return {
        "batch_size": batch,
        "raw_rows_per_s": round(raw),
        "raw_rows_per_s_samples": [round(x) for x in raw_rates],
        "nexus_rows_per_s": round(e2e),
        "nexus_rows_per_s_samples": [round(r.rows / r.seconds) for r in runs],
        "nexus_reencrypt_rows_per_s": round(reenc),
        "nexus_reencrypt_rows_per_s_samples": [round(r.rows / r.reencrypt_seconds)
                                               for r in runs],
        "nexus_seconds_samples": [round(r.seconds, 3) for r in runs],
        "nexus_phase_seconds": [r.phases for r in runs],
        "ratio_end_to_end": round(statistics.median(e2e_ratios), 3),
        "ratio_end_to_end_samples": [round(x, 3) for x in e2e_ratios],
        "ratio_reencrypt": round(statistics.median(reenc_ratios), 3),
        "ratio_reencrypt_samples": [round(x, 3) for x in reenc_ratios],
        "rss_before_mb": [round(r.rss_before_mb, 1) for r in runs],
        "rss_peak_mb": [round(r.rss_peak_mb, 1) for r in runs],
        "rss_growth_mb": round(max(r.rss_growth_mb for r in runs), 1),
        "rss_growth_mb_samples": [round(r.rss_growth_mb, 1) for r in runs],
    }


def bench_in_process(n: int, rounds: int, batches: list[int]) -> dict[str, Any]:
    """Populate once; then per round and per batch size: a raw pass, then a Nexus rotation."""
    directory = short_tmpdir("brot-")
    db = directory / "spike.db"
    app = build(nexus_config(directory))
    store, keys = app.store, app.keys
    conn = raw_connection(db)  # closed after the store (see test_tamper's WAL note)
    raw_rates: dict[int, list[float]] = {b: [] for b in batches}
    runs: dict[int, list[NexusRun]] = {b: [] for b in batches}
    try:
        keys.init(TEST_PASSWORD.encode())
        t0 = time.perf_counter()
        rows, plain_bytes = bulk_populate(conn, keys.keyring, n)
        populate_s = time.perf_counter() - t0
        blob_len = conn.execute("SELECT avg(length(blob)) FROM records").fetchone()[0]
        print(f"populated {rows:,} secrets in {populate_s:.1f} s "
              f"(plaintext avg {plain_bytes / rows:.0f} B, envelope avg {blob_len:.0f} B, "
              f"db {db.stat().st_size / 2**20:.0f} MiB)", flush=True)
        counter, engine = app.counter, app.rotation
        recorder = PhaseMarks()
        engine.add_listener(recorder)
        for r in range(rounds):
            for batch in batches:
                done, seconds = raw_pass(conn, keys.keyring, batch)
                assert done == n, (done, n)
                raw_rates[batch].append(done / seconds)
                run = nexus_pass(engine, recorder, n, batch)
                runs[batch].append(run)
                print(f"round {r + 1} batch {batch}: raw {done / seconds:9,.0f} rows/s "
                      f"({seconds:.2f} s); nexus {run.rows / run.seconds:9,.0f} rows/s start to "
                      f"completed ({run.seconds:.2f} s), re-encrypt phase "
                      f"{run.rows / run.reencrypt_seconds:9,.0f} rows/s; RSS "
                      f"+{run.rss_growth_mb:.1f} MB; phases {run.phases}", flush=True)
        # Every secret still decrypts, under the last generation only.
        counts = store.count_by_generation()
        assert counts == {keys.keyring.active_generation: n}, counts
        sample = store.get_secret(secret_path(n // 2))
        assert sample.blob is not None
        keys.keyring.decrypt(Purpose.SECRETS, sample.blob,
                             record_identity(KIND_SECRET, sample.path, sample.version))
        counter.flush()
    finally:
        app.close()
        conn.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "rows": n,
        "rounds": rounds,
        "populate_seconds": round(populate_s, 2),
        "plaintext_avg_bytes": round(plain_bytes / n, 1),
        "envelope_avg_bytes": round(float(blob_len), 1),
        "by_batch_size": {str(b): rates_for(runs[b], raw_rates[b], b) for b in batches},
    }



# --------------------------------------------------------------------------- served part


def populate_stopped_nexus(data_dir: Path, n: int) -> float:
    """Open the key from the backup in-process (the password), bulk insert, close."""
    t0 = time.perf_counter()
    db = data_dir / "spike.db"
    store = open_store("sqlite", path=db)
    conn = raw_connection(db)
    keys = build_keys(nexus_config(data_dir), store)
    try:
        keys.recover(TEST_PASSWORD.encode())
        bulk_populate(conn, keys.keyring, n, seed=2)
    finally:
        keys.seal()
        store.close()
        conn.close()
    return time.perf_counter() - t0


def get_latencies(stub: Any, request_cls: Any, paths: list[str], rng: random.Random,
                  count: int = 0, seconds: float = 0.0) -> list[float]:
    """``count`` Get calls, or as many as fit in ``seconds``; latencies in seconds."""
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    while (len(out) < count) if count else (time.perf_counter() < deadline):
        request = request_cls(path=rng.choice(paths))
        t0 = time.perf_counter()
        stub.Get(request, timeout=10)
        out.append(time.perf_counter() - t0)
    return out


def latencies_during_rotation(stub: Any, request_cls: Any, op: Any, op_pb: Any,
                              paths: list[str], rng: random.Random,
                              poll_every: float = 0.2) -> tuple[dict[str, list[float]], float]:
    """Get in a loop until the rotation is terminal; samples tagged with the last-polled phase."""
    by_phase: dict[str, list[float]] = {}
    phase_name = op_pb.RotationPhase.Name
    t_start = time.perf_counter()
    next_poll = 0.0
    phase = "reencrypt"
    while True:
        now = time.perf_counter()
        if now >= next_poll:
            event = op.RotationStatus(op_pb.RotationStatusRequest(), timeout=10)
            if event.terminal:
                if phase_name(event.phase) != "ROTATION_PHASE_COMPLETED":
                    raise RuntimeError(f"rotation ended {phase_name(event.phase)}: "
                                       f"{event.message}")
                return by_phase, time.perf_counter() - t_start
            phase = phase_name(event.phase).removeprefix("ROTATION_PHASE_").lower()
            next_poll = time.perf_counter() + poll_every
        request = request_cls(path=rng.choice(paths))
        t0 = time.perf_counter()
        stub.Get(request, timeout=10)
        by_phase.setdefault(phase, []).append(time.perf_counter() - t0)


def served_summary(n: int, rounds: int, rotate_args: list[str], durations: list[float],
                   idle_windows: list[list[float]], during_rounds: list[list[float]],
                   during: dict[str, list[float]]) -> dict[str, Any]:
    """The served part's figures from its latency samples."""
    all_during = [x for s in during.values() for x in s]
    idle = [x for s in idle_windows for x in s]
    # Per round: the rotation's p99 over the p99 of the two idle windows around it.
    round_ratios = [pct(during_rounds[r], 99) / pct(idle_windows[r] + idle_windows[r + 1], 99)
                    for r in range(rounds)]
    reenc = during.get("reencrypt", [])

    def summary(samples: list[float]) -> dict[str, float]:
        if not samples:
            return {"n": 0}
        return {"n": len(samples), "p50_ms": round(pct(samples, 50) * 1e3, 3),
                "p99_ms": round(pct(samples, 99) * 1e3, 3),
                "max_ms": round(max(samples) * 1e3, 3)}

    idle_s = summary(idle)
    out: dict[str, Any] = {
        "rows": n,
        "rounds": rounds,
        "default_batch_size": rotation_module.DEFAULT_BATCH_SIZE,
        "default_max_rate": rotation_module.DEFAULT_MAX_RATE,
        "rotate_args": rotate_args,
        "rotation_seconds_samples": [round(d, 2) for d in durations],
        "idle": idle_s,
        "during_rotation": summary(all_during),
        "during_reencrypt": summary(reenc),
        "during_by_phase": {p: summary(s) for p, s in during.items()},
    }
    out["p99_ratio"] = round(out["during_rotation"]["p99_ms"] / idle_s["p99_ms"], 3)
    out["p99_ratio_per_round"] = [round(x, 3) for x in round_ratios]
    out["idle_window_p99_ms"] = [round(pct(w, 99) * 1e3, 3) for w in idle_windows]
    out["rotation_round_p99_ms"] = [round(pct(w, 99) * 1e3, 3) for w in during_rounds]
    out["p99_ratio_reencrypt"] = (round(out["during_reencrypt"]["p99_ms"] / idle_s["p99_ms"], 3)
                                  if reenc else None)
    return out


def bench_served(n: int, rounds: int, first_idle_seconds: float,
                 rotate_args: list[str]) -> dict[str, Any]:
    import grpc

    from spike.identity import fetch_svid
    from spike.tls import client_channel
    from spike.v1 import operator_pb2, operator_pb2_grpc, secrets_pb2, secrets_pb2_grpc

    agent = DevAgent()
    data_dir = short_tmpdir("brs-")
    nexus: Nexus | None = None
    channel: grpc.Channel | None = None
    try:
        nexus = Nexus(data_dir, agent.env("nexus"))
        result = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        nexus.stop()
        populate_s = populate_stopped_nexus(data_dir, n)
        nexus = Nexus(data_dir, agent.env("nexus"))
        result = pilot(["recover", "--password-stdin"], agent.env("pilot"), nexus,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        print(f"served: {n} secrets populated in {populate_s:.1f} s; Nexus recovered", flush=True)

        channel = client_channel(nexus.address, fetch_svid(agent.socket("pilot")),
                                 "nexus.spike.internal")
        stub = secrets_pb2_grpc.SecretsStub(channel)
        op = operator_pb2_grpc.OperatorStub(channel)
        rng = random.Random(3)
        paths = [secret_path(i) for i in range(n)]
        check = stub.Get(secrets_pb2.GetSecretRequest(path=paths[7]), timeout=10)
        assert check.data["username"] == "svc-0000007", check.data
        get_latencies(stub, secrets_pb2.GetSecretRequest, paths, rng, 300)  # warm-up

        # Idle and rotation windows alternate and last about as long as each other, so the
        # noise of a shared machine lands on both: idle, rotate, idle, rotate, ..., idle.
        idle_windows: list[list[float]] = []
        during_rounds: list[list[float]] = []
        during: dict[str, list[float]] = {}
        durations = []
        window = first_idle_seconds
        for r in range(rounds):
            idle_windows.append(get_latencies(stub, secrets_pb2.GetSecretRequest, paths, rng,
                                              seconds=window))
            started = pilot(["rotate", "--detach", "--output", "json", *rotate_args],
                            agent.env("pilot"), nexus)
            assert started.returncode == 0, started.stderr
            by_phase, seconds = latencies_during_rotation(
                stub, secrets_pb2.GetSecretRequest, op, operator_pb2, paths, rng)
            durations.append(seconds)
            window = seconds
            during_rounds.append([x for s in by_phase.values() for x in s])
            for phase, samples in by_phase.items():
                during.setdefault(phase, []).extend(samples)
            counts = {p: len(s) for p, s in by_phase.items()}
            print(f"served round {r + 1}: rotation of {n:,} secrets observed for {seconds:.1f} s "
                  f"after `spike rotate --detach` returned; gets per phase {counts}", flush=True)
        idle_windows.append(get_latencies(stub, secrets_pb2.GetSecretRequest, paths, rng,
                                          seconds=window))
    finally:
        if channel is not None:
            channel.close()
        if nexus is not None:
            nexus.stop()
        agent.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    return served_summary(n, rounds, rotate_args, durations, idle_windows, during_rounds,
                          during)


# --------------------------------------------------------------------------- main


def targets_of_run(by_batch: dict[str, Any] | None, batches: list[int],
                   served: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The entries ``make bench`` checks (tests/benchkit.py). The in-process throughput is a
    diagnosis beside the end-to-end figure of tests/bench_rotation_e2e.py."""
    out = []
    if by_batch is not None:
        headline = by_batch[str(batches[0])]
        out.append(target("rotation in process, start -> completed / raw",
                          headline["ratio_end_to_end"], ">=", TARGET_THROUGHPUT_RATIO))
        out.append(target("peak RSS growth during a rotation (MB)",
                          max(b["rss_growth_mb"] for b in by_batch.values()), "<=",
                          TARGET_RSS_MB))
    if served is not None:
        out.append(target("get p99 during a default-throttled rotation / idle",
                          served["p99_ratio"], "<=", TARGET_P99_RATIO))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_rotation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (< 3 min)")
    parser.add_argument("-n", type=int, default=0, help="secrets for the in-process part")
    parser.add_argument("--rounds", type=int, default=0,
                        help="raw/nexus rounds (default 3; 5 with --quick)")
    parser.add_argument("--batch-size", type=int, action="append", default=[],
                        help="batch size(s) for the in-process part (repeatable; default: "
                             "the engine's default batch size, 500; `spike rotate --emergency` "
                             "alone uses 2,000)")
    parser.add_argument("--served-n", type=int, default=0, help="secrets for the served part")
    parser.add_argument("--served-rounds", type=int, default=0)
    parser.add_argument("--no-served", action="store_true", help="skip the real-process part")
    parser.add_argument("--served-rotate-arg", action="append", default=[], metavar="ARG",
                        help="extra `spike rotate` argument for the served part, e.g. "
                             "--served-rotate-arg=--max-rate=5000 (default: none, i.e. the "
                             "default throttle)")
    parser.add_argument("--no-in-process", action="store_true",
                        help="skip the in-process part")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.n or (50_000 if args.quick else 1_000_000)
    rounds = args.rounds or (5 if args.quick else 3)
    served_n = args.served_n or (20_000 if args.quick else 100_000)
    served_rounds = args.served_rounds or 2
    first_idle = 5.0
    default_batch = rotation_module.DEFAULT_BATCH_SIZE
    batches = list(dict.fromkeys(args.batch_size or [default_batch]))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()

    inproc = None if args.no_in_process else bench_in_process(n, rounds, batches)
    served = None if args.no_served else bench_served(served_n, served_rounds, first_idle,
                                                      args.served_rotate_arg)
    wall = time.perf_counter() - started

    by_batch: dict[str, Any] = inproc["by_batch_size"] if inproc else {}
    ok_tp = (by_batch[str(batches[0])]["ratio_end_to_end"] >= TARGET_THROUGHPUT_RATIO
             if inproc else None)
    ok_rss = (max(b["rss_growth_mb"] for b in by_batch.values()) < TARGET_RSS_MB
              if inproc else None)
    ok_p99 = served is not None and served["p99_ratio"] <= TARGET_P99_RATIO
    print()
    print(f"rotation benchmark: {n:,} secrets in-process, {rounds} rounds; "
          f"{os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"SQLite {sqlite3.sqlite_version}")
    print(f"{'measurement':50} {'median':>16} {'target':>10} {'met':>4}")

    def line(name: str, value: str, target: str = "", met: bool | None = None) -> None:
        flag = "" if met is None else ("yes" if met else "NO")
        print(f"{name:50} {value:>16} {target:>10} {flag:>4}")

    for batch in batches if inproc else []:
        fig = by_batch[str(batch)]
        headline = batch == batches[0]
        line(f"[batch {batch}] raw limit (AESGCM + sqlite3 update)",
             f"{fig['raw_rows_per_s']:,} /s")
        line(f"[batch {batch}] nexus rotation, start -> completed",
             f"{fig['nexus_rows_per_s']:,} /s")
        line(f"[batch {batch}] nexus rotation, re-encrypt phase",
             f"{fig['nexus_reencrypt_rows_per_s']:,} /s")
        line(f"[batch {batch}]   ratio start -> completed / raw",
             f"{fig['ratio_end_to_end']:.2f}", f">= {TARGET_THROUGHPUT_RATIO}",
             fig["ratio_end_to_end"] >= TARGET_THROUGHPUT_RATIO if headline else None)
        line(f"[batch {batch}]   ratio re-encrypt phase / raw", f"{fig['ratio_reencrypt']:.2f}")
        line(f"[batch {batch}] peak RSS growth during rotation (max)",
             f"{fig['rss_growth_mb']:.1f} MB", f"< {TARGET_RSS_MB:.0f} MB",
             fig["rss_growth_mb"] < TARGET_RSS_MB)
    if served is not None:
        idle, dur, ree = served["idle"], served["during_rotation"], served["during_reencrypt"]
        line(f"get p50 / p99 idle (n={idle['n']})",
             f"{idle['p50_ms']:.2f}/{idle['p99_ms']:.2f} ms")
        line(f"get p50 / p99 during rotation (n={dur['n']})",
             f"{dur['p50_ms']:.2f}/{dur['p99_ms']:.2f} ms")
        if ree.get("n"):
            line(f"  of which re-encrypt phase (n={ree['n']})",
                 f"{ree['p50_ms']:.2f}/{ree['p99_ms']:.2f} ms")
        line("  p99 ratio during rotation / idle", f"{served['p99_ratio']:.2f}",
             f"<= {TARGET_P99_RATIO}", ok_p99)
        line("  per round (vs the idle windows around it)",
             "/".join(f"{x:.2f}" for x in served["p99_ratio_per_round"]))
        print(f"  (default throttle: batch {served['default_batch_size']}, max rate "
              f"{served['default_max_rate']:,}/s; extra rotate args {served['rotate_args']}; "
              f"{served_n:,} secrets served)")
    print(f"wall time {wall:.0f} s")
    report = {
        "benchmark": "rotation",
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "in_process": inproc,
        "served": served,
        "thresholds": {"throughput_ratio": TARGET_THROUGHPUT_RATIO,
                       "rss_growth_mb": TARGET_RSS_MB, "p99_ratio": TARGET_P99_RATIO},
        "targets": targets_of_run(by_batch if inproc else None, batches, served),
        "target_met": {"throughput_ratio": ok_tp, "rss_growth": ok_rss,
                       "p99_ratio": ok_p99 if served is not None else None},
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

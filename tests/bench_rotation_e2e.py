"""Benchmark: `spike rotate --emergency` end to end, against the raw limit in the same run.

    python -m tests.bench_rotation_e2e            # 200,000 secrets, 3 rounds; p99 part 100,000
    python -m tests.bench_rotation_e2e --quick    # 20,000 secrets, 3 rounds; p99 part 6,000

Part 1, end to end. A real ``spike-nexus`` process on SQLite with the dev agent's SVIDs,
initialised through Pilot; while it is stopped the store is filled the fast way
(``tests.bench_rotation.bulk_populate``: the rows ``put_secret`` writes, sealed by the real
keyring, ~256-byte JSON plaintexts), then it is started again and recovered through Pilot.
A copy of the filled database (same rows, same key) is kept for the baseline.

- ``raw limit``: ``tests.bench_rotation.raw_pass`` on the copy: keyset read, AES-GCM decrypt
  and encrypt with ``cryptography``'s ``AESGCM``, ``executemany`` UPDATE by primary key in one
  ``BEGIN IMMEDIATE`` transaction per batch of 2,000 (the emergency batch size), WAL,
  ``synchronous=FULL``. No checks, no backup, no validation, no progress.
- ``spike rotate --emergency``: the real CLI as a user runs it (``python -m pilot rotate
  --emergency --output json``, which follows the rotation to its terminal event), timed from
  exec to exit; it must exit 0 with the rotation COMPLETED. Every record is then under the new
  generation only (``spike rotation status`` and a read of one secret check it).

Raw pass and rotation alternate (raw, rotate, raw, rotate, ...); the ratio is the median of the
per-round ratios (records/s of the rotation over records/s of the raw pass just before it).
Phase marks come from Nexus's own ``rotation phase`` log lines.

Part 2 (``tests.bench_rotation.bench_served``): foreground ``Get`` p99 during a throttled
rotation (`spike rotate --detach`, default throttle) against idle windows around it, target
<= 2.

Prints a table and, as its last line, one JSON object with ``targets``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from nexus.app import build_keys
from nexus.core import rotation as rotation_module
from tests.bench_rotation import (
    TARGET_P99_RATIO,
    bench_served,
    bulk_populate,
    raw_connection,
    raw_pass,
    secret_path,
)
from tests.harness import PY, TEST_PASSWORD, DevAgent, Nexus, nexus_config, pilot, short_tmpdir

TARGET_E2E_RATIO = 0.6


def _phase_marks(nexus: Nexus, since: int) -> dict[str, float]:
    """Seconds spent in each phase, from the ``rotation phase`` log lines after line
    ``since`` (the time from one phase's line to the next one's)."""
    marks: list[tuple[str, float]] = []
    for line in nexus.lines[since:]:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if doc.get("event") == "rotation phase" and "timestamp" in doc:
            stamp = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
            marks.append((str(doc["phase"]), stamp.timestamp()))
    return {a: round(tb - ta, 3) for (a, ta), (_, tb) in itertools.pairwise(marks)}


def _rotate(agent: DevAgent, nexus: Nexus, batch: int) -> tuple[float, dict[str, Any]]:
    """`spike rotate --emergency` from exec to exit: (seconds, its last JSON event)."""
    args = ["rotate", "--emergency", "--output", "json",
            *([f"--batch-size={batch}"] if batch else [])]
    t0 = time.perf_counter()
    result = pilot(args, agent.env("pilot"), nexus, timeout=1800)
    seconds = time.perf_counter() - t0
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:],
                                    result.stderr[-2000:])
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["phase"] == "completed", last
    return seconds, last


def _check_store(agent: DevAgent, nexus: Nexus, n: int, generation: int) -> None:
    """Every record under ``generation`` and a secret still reads back."""
    db = sqlite3.connect(f"file:{nexus.data_dir / 'spike.db'}?mode=ro", uri=True)
    try:
        counts = dict(db.execute("SELECT generation, count(*) FROM records"
                                 " WHERE blob IS NOT NULL GROUP BY generation").fetchall())
    finally:
        db.close()
    assert counts == {generation: n}, counts
    got = pilot(["secret", "get", secret_path(n // 3), "--output", "json"],
                agent.env("pilot"), nexus)
    assert got.returncode == 0, got.stderr
    assert f"svc-{n // 3:07d}" in got.stdout


def _prepare(agent: DevAgent, data_dir: Path, raw_db: Path, n: int) -> tuple[Any, float]:
    """Initialise through Pilot, fill the stopped Nexus's store, copy it to ``raw_db``;
    returns (the key manager, unsealed in-process for the raw passes, and seconds)."""
    from nexus.store import open_store

    nexus = Nexus(data_dir, agent.env("nexus"))
    result = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                   stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    nexus.stop()
    t0 = time.perf_counter()
    store = open_store("sqlite", path=data_dir / "spike.db")
    keys = build_keys(nexus_config(data_dir), store)
    keys.recover(TEST_PASSWORD.encode())
    conn = raw_connection(data_dir / "spike.db")
    try:
        bulk_populate(conn, keys.keyring, n, seed=2)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
        store.close()
    shutil.copyfile(data_dir / "spike.db", raw_db)
    return keys, time.perf_counter() - t0


def _rounds(agent: DevAgent, nexus: Nexus, raw_conn: sqlite3.Connection, keyring: Any,
            n: int, rounds: int, batch: int) -> dict[str, list[Any]]:
    """Raw pass, then `spike rotate --emergency`, ``rounds`` times."""
    out: dict[str, list[Any]] = {"raw": [], "e2e": [], "ratio": [], "seconds": [],
                                 "phases": []}
    for r in range(rounds):
        done, raw_s = raw_pass(raw_conn, keyring, batch or 2000)
        assert done == n, (done, n)
        since = len(nexus.lines)
        seconds, last = _rotate(agent, nexus, batch)
        _check_store(agent, nexus, n, last["to_generation"])
        marks = _phase_marks(nexus, since)
        out["raw"].append(n / raw_s)
        out["e2e"].append(n / seconds)
        out["ratio"].append(raw_s / seconds)
        out["seconds"].append(seconds)
        out["phases"].append(marks)
        print(f"round {r + 1}: raw {n / raw_s:9,.0f} rows/s ({raw_s:.2f} s); "
              f"spike rotate --emergency {n / seconds:9,.0f} rows/s ({seconds:.2f} s, "
              f"exec to exit); ratio {raw_s / seconds:.2f}; phases {marks}", flush=True)
    return out


def bench_end_to_end(n: int, rounds: int, batch: int) -> dict[str, Any]:
    agent = DevAgent()
    data_dir = short_tmpdir("bre-")
    raw_dir = short_tmpdir("brr-")
    nexus: Nexus | None = None
    keys = None
    raw_conn: sqlite3.Connection | None = None
    try:
        keys, populate_s = _prepare(agent, data_dir, raw_dir / "raw.db", n)
        raw_conn = raw_connection(raw_dir / "raw.db")
        nexus = Nexus(data_dir, agent.env("nexus"))
        result = pilot(["recover", "--password-stdin"], agent.env("pilot"), nexus,
                       stdin=TEST_PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        print(f"end to end: {n:,} secrets populated in {populate_s:.1f} s; Nexus recovered",
              flush=True)
        got = _rounds(agent, nexus, raw_conn, keys.keyring, n, rounds, batch)
    finally:
        if raw_conn is not None:
            raw_conn.close()
        if keys is not None:
            keys.seal()
        if nexus is not None:
            nexus.stop()
        agent.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(raw_dir, ignore_errors=True)
    return {
        "rows": n,
        "rounds": rounds,
        "batch_size": batch or rotation_module.EMERGENCY_BATCH_SIZE,
        "command": [Path(PY).name, "-m", "pilot", "rotate", "--emergency", "--output", "json"],
        "populate_seconds": round(populate_s, 2),
        "raw_rows_per_s": round(statistics.median(got["raw"])),
        "e2e_rows_per_s": round(statistics.median(got["e2e"])),
        "ratio": round(statistics.median(got["ratio"]), 3),
        "raw_rows_per_s_samples": [round(x) for x in got["raw"]],
        "e2e_rows_per_s_samples": [round(x) for x in got["e2e"]],
        "ratio_samples": [round(x, 3) for x in got["ratio"]],
        "rotate_seconds_samples": [round(x, 2) for x in got["seconds"]],
        "phase_seconds_samples": got["phases"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_rotation_e2e",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    parser.add_argument("-n", type=int, default=0, help="secrets for the end-to-end part")
    parser.add_argument("--rounds", type=int, default=0, help="raw/rotate rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="`spike rotate --batch-size` (default: Nexus's emergency default)")
    parser.add_argument("--served-n", type=int, default=0,
                        help="secrets for the foreground p99 part")
    parser.add_argument("--no-served", action="store_true", help="skip the p99 part")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    rounds = args.rounds or 3
    served_n = args.served_n or (6_000 if args.quick else 100_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    e2e = bench_end_to_end(n, rounds, args.batch_size)
    served = None if args.no_served else bench_served(served_n, 2, 3.0 if args.quick else 5.0,
                                                      [])
    wall = time.perf_counter() - started
    targets = [{"name": "rotation end to end / raw", "value": e2e["ratio"],
                "target": f">= {TARGET_E2E_RATIO}", "met": e2e["ratio"] >= TARGET_E2E_RATIO}]
    if served is not None:
        targets.append({"name": "get p99 during throttled rotation / idle",
                        "value": served["p99_ratio"], "target": f"<= {TARGET_P99_RATIO}",
                        "met": served["p99_ratio"] <= TARGET_P99_RATIO})
    print()
    print(f"rotation end to end: {n:,} secrets, {rounds} rounds; {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}")
    print(f"{'measurement':52} {'median':>14} {'target':>8} {'met':>4}")
    print(f"{'raw limit (AESGCM + batched sqlite3 update)':52} "
          f"{e2e['raw_rows_per_s']:>11,} /s")
    print(f"{'spike rotate --emergency, exec to exit':52} {e2e['e2e_rows_per_s']:>11,} /s")
    for t in targets:
        print(f"{t['name']:52} {t['value']:>14.2f} {t['target']:>8} "
              f"{'yes' if t['met'] else 'NO':>4}")
    print(f"wall time {wall:.0f} s")
    print(json.dumps({"benchmark": "rotation_e2e", "mode": "quick" if args.quick else "full",
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "sqlite": sqlite3.sqlite_version, "end_to_end": e2e, "served": served,
                      "targets": targets, "wall_seconds": round(wall, 1)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

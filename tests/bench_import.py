"""Benchmark: `spike secret import` end to end next to the raw load limit, in the same run.

    python -m tests.bench_import            # 100,000 secrets per round
    python -m tests.bench_import --quick    # 5,000 secrets per round (< 60 s)

- ``raw``: in process, the load limit of the storage: read the same JSON lines file, parse
  each line, canonical JSON of its data, AES-GCM encrypt it (``cryptography``'s ``AESGCM``,
  fresh nonce, the record identity as associated data), and insert it with plain ``sqlite3``
  ``executemany`` (the record row and its metadata row), one ``BEGIN IMMEDIATE`` ...
  ``COMMIT`` per batch of 1000, on a SQLite file made by Nexus's own store (same schema, WAL,
  ``synchronous=FULL``).
- ``import``: a real ``spike-nexus`` process (dev agent SVIDs, mTLS), and the wall time of
  ``spike secret import --file F --output json`` as a process, from exec to exit.
- ``import, progress bar``: the same in text mode with stderr on a pseudo-terminal (the rich
  progress bar drawn), to show that the bar does not cost throughput (reported, no target).

Rounds alternate (raw, import, raw, import, ...), each round on its own paths (so each
line is a new secret on both sides); the ratio is the median of the per-round ratios
(import rate / raw rate of the same round). Prints a table, then one JSON object (the last
line) with every sample and the target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pty
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nexus.crypto.envelope import record_identity
from nexus.store import open_store
from nexus.store.base import KIND_SECRET
from tests.harness import PY, ROOT, DevAgent, Nexus, short_tmpdir, start_unsealed

TARGET = 0.3
RAW_BATCH = 1000


def write_lines(path: Path, prefix: str, n: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"path": f"{prefix}/svc-{i:07d}",
                                  "data": {"user": f"user{i}",
                                           "password": secrets.token_urlsafe(24)}}) + "\n")


def raw_db(directory: Path) -> Path:
    db = directory / "raw.db"
    open_store("sqlite", path=db).close()
    return db


def raw_load(db: Path, source: Path) -> float:
    """Seconds to parse, encrypt and durably insert every line of ``source``."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    began = time.perf_counter()
    records: list[tuple[Any, ...]] = []
    metas: list[tuple[Any, ...]] = []

    def flush() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO secret_meta (path, current_version, oldest_version,"
                         " created_at, updated_at) VALUES (?, 1, 1, ?, ?)", metas)
        conn.executemany("INSERT INTO records (kind, path, version, generation, blob,"
                         " created_at, deleted_at, destroyed) VALUES (?, ?, 1, 1, ?, ?,"
                         " NULL, 0)", records)
        conn.execute("COMMIT")
        records.clear()
        metas.clear()

    with source.open(encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            path = doc["path"]
            plain = json.dumps(doc["data"], sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
            nonce = os.urandom(12)
            blob = nonce + aead.encrypt(nonce, plain, record_identity(KIND_SECRET, path, 1))
            now = time.time()
            metas.append((path, now, now))
            records.append((KIND_SECRET, path, blob, now))
            if len(records) >= RAW_BATCH:
                flush()
    if records:
        flush()
    elapsed = time.perf_counter() - began
    conn.close()
    return elapsed


def pilot_import(agent: DevAgent, server: Nexus, source: Path, n: int) -> float:
    env = agent.env("pilot") | {"SPIKE_NEXUS_ADDR": server.address}
    began = time.perf_counter()
    done = subprocess.run([PY, "-m", "pilot", "secret", "import", "--file", str(source),
                           "--output", "json"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"import failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.splitlines()[-1])
    if summary != {"imported": n, "failed": 0}:
        raise RuntimeError(f"import summary {summary}")
    return elapsed


def pilot_import_with_bar(agent: DevAgent, server: Nexus, source: Path) -> float:
    """The same import in text mode with stderr on a pseudo-terminal: the progress bar."""
    env = agent.env("pilot") | {"SPIKE_NEXUS_ADDR": server.address, "COLUMNS": "100"}
    leader, follower = pty.openpty()
    drained: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                drained.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    began = time.perf_counter()
    done = subprocess.run([PY, "-m", "pilot", "secret", "import", "--file", str(source)],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=follower,
                          timeout=1800, check=False)
    elapsed = time.perf_counter() - began
    os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    if done.returncode != 0:
        raise RuntimeError(f"import with a bar failed ({done.returncode})")
    if b"import" not in b"".join(drained):
        raise RuntimeError("no progress bar was drawn")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 secrets per round")
    parser.add_argument("--n", type=int, default=0, help="secrets per round")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3)")
    args = parser.parse_args(argv)
    n = args.n or (5_000 if args.quick else 100_000)
    rounds = args.rounds or 3
    work = short_tmpdir("bimp-")
    agent = DevAgent()
    server: Nexus | None = None
    raw_rates: list[float] = []
    import_rates: list[float] = []
    ratios: list[float] = []
    bar_rates: list[float] = []
    try:
        server = start_unsealed(agent, work / "nexus")
        db = raw_db(work)
        for r in range(rounds):
            source = work / f"round{r}.jsonl"
            write_lines(source, f"r{r}", n)
            raw = n / raw_load(db, source)
            imported = n / pilot_import(agent, server, source, n)
            raw_rates.append(raw)
            import_rates.append(imported)
            ratios.append(imported / raw)
            write_lines(source, f"bar{r}", n)
            bar_rates.append(n / pilot_import_with_bar(agent, server, source))
            print(f"round {r + 1}: raw {raw:,.0f}/s  import {imported:,.0f}/s  "
                  f"ratio {imported / raw:.3f}  with the bar {bar_rates[-1]:,.0f}/s",
                  file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(ratios)
    print(f"raw load limit     {statistics.median(raw_rates):>10,.0f} secrets/s")
    print(f"spike secret import{statistics.median(import_rates):>10,.0f} secrets/s")
    print(f"import, progress bar{statistics.median(bar_rates):>9,.0f} secrets/s (a terminal)")
    print(f"import / raw       {ratio:>10.3f}   (target >= {TARGET})")
    result = {
        "bench": "import", "mode": "quick" if args.quick else "full", "n": n,
        "rounds": rounds, "machine": platform.machine(), "cpus": os.cpu_count(),
        "raw_per_s": raw_rates, "import_per_s": import_rates, "ratios": ratios,
        "import_with_bar_per_s": bar_rates,
        "targets": [{"name": "import end to end / raw", "value": ratio,
                     "target": f">= {TARGET}", "met": ratio >= TARGET}],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: root key init / recover next to a bare Argon2id of the same parameters.

    python -m tests.bench_keys            # N=7
    python -m tests.bench_keys --quick    # N=3

Everything uses the PRODUCTION Argon2id parameters (RFC 9106 second recommendation: t=3,
m=64 MiB, p=4, 96-byte output) and is measured in the same run:

- ``argon2``: ``argon2.low_level.hash_secret_raw`` alone (the floor);
- ``init (in-process)``: ``KeyManager.init`` on a new SQLite store in a new temp dir;
- ``recover (in-process)``: ``KeyManager.recover`` from that backup by a fresh ``KeyManager``;
- ``spike init`` / ``spike recover`` (end to end): wall time of the Pilot process against a real
  Nexus started without ``--insecure-test-kdf`` (so it includes Python start-up, imports, the
  SVID fetch and the mTLS handshake);
- ``spike status``: the same Pilot start-up + RPC with no KDF, to show what part of the
  end-to-end figure is process/CLI overhead.

Prints a table and then one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import structlog
from argon2.low_level import Type, hash_secret_raw

from nexus.app import build_keys
from nexus.crypto.kdf import KdfParams
from nexus.store import open_store
from tests.benchkit import target
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, nexus_config, pilot, short_tmpdir

TARGET_RATIO = 1.2


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_argon2(params: KdfParams, n: int) -> list[float]:
    password = TEST_PASSWORD.encode()
    out = []
    for _ in range(n):
        salt = os.urandom(params.salt_len)
        out.append(timed(lambda salt=salt: hash_secret_raw(  # type: ignore[misc]
            password, salt, time_cost=params.time_cost, memory_cost=params.memory_kib,
            parallelism=params.parallelism, hash_len=params.out_len, type=Type.ID)))
    return out


def bench_in_process(params: KdfParams, n: int) -> tuple[list[float], list[float]]:
    inits, recovers = [], []
    for _ in range(n):
        directory = short_tmpdir("bk-")
        config = nexus_config(directory, insecure_test_kdf=False,
                              kdf_time_cost=params.time_cost, kdf_memory_kib=params.memory_kib,
                              kdf_parallelism=params.parallelism)
        try:
            store = open_store("sqlite", path=directory / "spike.db")
            km = build_keys(config, store)
            inits.append(timed(lambda km=km: km.init(TEST_PASSWORD.encode())))  # type: ignore[misc]
            km.seal()
            store.close()
            store = open_store("sqlite", path=directory / "spike.db")
            km = build_keys(config, store)
            recovers.append(timed(lambda km=km: km.recover(TEST_PASSWORD.encode())))  # type: ignore[misc]
            km.seal()
            store.close()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return inits, recovers


def bench_end_to_end(n: int) -> dict[str, list[float]]:
    agent = DevAgent()
    pw_dir = short_tmpdir("bp-")
    pw = pw_dir / "pw"
    pw.write_text(TEST_PASSWORD + "\n")
    pw.chmod(0o600)
    env = agent.env("pilot")
    samples: dict[str, list[float]] = {"init": [], "recover": [], "status": []}
    try:
        for _ in range(n):
            data_dir = short_tmpdir("bn-")
            nexus = Nexus(data_dir, agent.env("nexus"), insecure_kdf=False)
            try:
                t0 = time.perf_counter()
                result = pilot(["init", "--password-file", str(pw)], env, nexus)
                samples["init"].append(time.perf_counter() - t0)
                assert result.returncode == 0, result.stderr
                nexus.kill()
                nexus = Nexus(data_dir, agent.env("nexus"), insecure_kdf=False)
                t0 = time.perf_counter()
                result = pilot(["status"], env, nexus)
                samples["status"].append(time.perf_counter() - t0)
                assert result.returncode == 0, result.stderr
                t0 = time.perf_counter()
                result = pilot(["recover", "--password-file", str(pw)], env, nexus)
                samples["recover"].append(time.perf_counter() - t0)
                assert result.returncode == 0, result.stderr
            finally:
                nexus.stop()
                shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        agent.stop()
        shutil.rmtree(pw_dir, ignore_errors=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=3")
    parser.add_argument("-n", type=int, default=0, help="samples per measurement (default 7)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the real-process part")
    args = parser.parse_args(argv)
    n = args.n or (3 if args.quick else 7)
    params = KdfParams()
    params.require_production()
    # The in-process KeyManager logs at info; keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    # Warm-up, not counted: imports, the zxcvbn word lists, OpenSSL's first ML-KEM use.
    bench_argon2(params, 1)
    bench_in_process(params, 1)

    argon = bench_argon2(params, n)
    inits, recovers = bench_in_process(params, n)
    e2e = {} if args.no_e2e else bench_end_to_end(n)

    base = median_of(argon)
    rows: list[tuple[str, list[float]]] = [
        ("argon2id hash_secret_raw", argon),
        ("KeyManager.init (in-process)", inits),
        ("KeyManager.recover (in-process)", recovers),
    ]
    if e2e:
        rows += [("spike init (end to end)", e2e["init"]),
                 ("spike recover (end to end)", e2e["recover"]),
                 ("spike status (no KDF, CLI baseline)", e2e["status"])]
    print(f"Argon2id t={params.time_cost} m={params.memory_kib} KiB p={params.parallelism} "
          f"out={params.out_len} B; N={n}; {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}")
    print(f"{'measurement':38} {'median s':>9} {'min s':>8} {'max s':>8} {'x argon2':>9}")
    for name, samples in rows:
        print(f"{name:38} {median_of(samples):9.3f} {min(samples):8.3f} {max(samples):8.3f} "
              f"{median_of(samples) / base:9.2f}")
    ratios = {
        "init_in_process": median_of(inits) / base,
        "recover_in_process": median_of(recovers) / base,
    }
    if e2e:
        cli = median_of(e2e["status"])
        ratios |= {
            "init_end_to_end": median_of(e2e["init"]) / base,
            "recover_end_to_end": median_of(e2e["recover"]) / base,
            "init_end_to_end_minus_cli_baseline": (median_of(e2e["init"]) - cli) / base,
            "recover_end_to_end_minus_cli_baseline": (median_of(e2e["recover"]) - cli) / base,
        }
    ok = ratios["init_in_process"] <= TARGET_RATIO and ratios["recover_in_process"] <= TARGET_RATIO
    print(f"in-process overhead target <= {TARGET_RATIO}: {'met' if ok else 'NOT met'} "
          f"(init {ratios['init_in_process']:.2f}, recover {ratios['recover_in_process']:.2f})")
    report = {
        "benchmark": "root_key_lifecycle",
        "kdf": {"time_cost": params.time_cost, "memory_kib": params.memory_kib,
                "parallelism": params.parallelism, "out_len": params.out_len},
        "n": n,
        "cpus": os.cpu_count(),
        "median_seconds": {name: round(median_of(s), 4) for name, s in rows},
        "samples_seconds": {name: [round(x, 4) for x in s] for name, s in rows},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "target_in_process": TARGET_RATIO,
        "target_met_in_process": ok,
        "targets": [
            target("init in process / bare Argon2id", ratios["init_in_process"], "<=",
                   TARGET_RATIO),
            target("recover in process / bare Argon2id", ratios["recover_in_process"], "<=",
                   TARGET_RATIO),
        ],
    }
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

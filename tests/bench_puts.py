"""Benchmark: durable secret puts through Nexus, group commit on against off (today's).

    python -m tests.bench_puts [--quick] [--requests N] [--rounds N] [--threads 4,16,32]

Two Nexus processes on SQLite (WAL, ``synchronous=FULL``), each on its own data directory:
one with ``--group-commit off`` (every put its own transaction and fsync, as before group
commit existed) and one with the default ``--group-commit on``. The client is as in
``tests.bench_secrets``: gRPC threads, one mTLS channel each, Pilot's SVID from the dev
agent; every put writes a new path (so each is a real insert, not a CAS retry). Each round
runs every load (each thread count, then one thread for latency) against both servers,
the order alternating from round to round (off first in even rounds, on first in odd ones),
so a drift of this shared machine favours neither. Throughputs and latencies are medians
over the rounds; each ratio is the median of the per-round ratios.

Targets: 4-thread put throughput with group commit / without >= 3; single-writer p50
latency with group commit / without <= 1.05 (a lone writer takes the lead at once: the
queue adds two uncontended lock round trips, microseconds against a put of a millisecond
or more, and 5 % is below the round-to-round spread of this machine). The last stdout line
is one JSON object with every sample and the targets (``tests/bench.py`` reads it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.bench_secrets import SECRET, run_load, seed_nexus
from tests.harness import DevAgent, Nexus, short_tmpdir

MODES = ("off", "on")


def put_call(tag: str) -> Callable[[grpc.Channel, int, int], Callable[[], Any]]:
    """A load whose call ``i`` of thread ``t`` writes a path of its own under ``tag``."""

    def make(ch: grpc.Channel, t: int, i: int) -> Callable[[], Any]:
        s = secrets_pb2_grpc.SecretsStub(ch)
        req = secrets_pb2.PutSecretRequest(path=f"bench/{tag}/t{t}/r{i}", data=SECRET)
        return lambda: s.Put(req, timeout=60)

    return make


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_puts")
    parser.add_argument("--quick", action="store_true", help="small N (a smoke run)")
    parser.add_argument("--requests", type=int, default=0,
                        help="puts per thread per load and round")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (each: off and on)")
    parser.add_argument("--threads", default="4,16,32",
                        help="comma-separated concurrent thread counts (1 is always run)")
    return parser.parse_args(argv)


def merged(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "requests": sum(int(r["requests"]) for r in runs),
        "per_second": round(statistics.median(r["per_second"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "per_second_runs": [round(r["per_second"], 1) for r in runs],
        "p50_ms_runs": [round(r["p50_ms"], 3) for r in runs],
    }


def target(name: str, value: float, op: str, bound: float) -> dict[str, Any]:
    met = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": round(value, 3), "target": f"{op} {bound}", "met": met}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = sorted({int(x) for x in args.threads.split(",") if x.strip()} - {1})
    requests = args.requests or (60 if args.quick else 400)
    rounds = args.rounds or (2 if args.quick else 6)
    loads = [*counts, 1]
    agent = DevAgent()
    dirs: dict[str, Path] = {}
    servers: dict[str, Nexus] = {}
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        m: {n: [] for n in loads} for m in MODES}
    try:
        material = None
        for mode in MODES:
            dirs[mode] = short_tmpdir(f"nxp{mode}-")
            servers[mode] = Nexus(dirs[mode], agent.env("nexus"),
                                  args=["--group-commit", mode])
            material, _ = seed_nexus(agent, servers[mode])
        assert material is not None
        for index in range(rounds):
            order = MODES if index % 2 == 0 else MODES[::-1]
            for threads in loads:
                for mode in order:
                    n = requests if threads > 1 else max(requests // 2, 30)
                    samples[mode][threads].append(run_load(
                        servers[mode].address, material, threads, n,
                        put_call(f"r{index}x{threads}")))
    finally:
        for server in servers.values():
            server.stop()
        agent.stop()
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)

    results = {m: {str(n): merged(samples[m][n]) for n in loads} for m in MODES}

    def ratios(threads: int, key: str) -> list[float]:
        return [on[key] / off[key] for off, on in zip(samples["off"][threads],
                                                       samples["on"][threads], strict=True)]

    speedups = {str(n): round(statistics.median(ratios(n, "per_second")), 3) for n in loads}
    latency = statistics.median(ratios(1, "p50_ms"))
    targets = []
    if 4 in counts:
        targets.append(target("durable puts, group commit / today's 4-thread",
                              speedups["4"], ">=", 3.0))
    targets.append(target("single-writer p50 latency, group / today", latency, "<=", 1.05))

    print(f"\n{'quick' if args.quick else 'full'} run: {rounds} rounds, {requests} puts per "
          "thread per load")
    print(f"{'load':14} {'off req/s':>10} {'on req/s':>10} {'on/off':>7} "
          f"{'off p50':>8} {'on p50':>8} {'off p99':>8} {'on p99':>8}")
    for n in loads:
        off, on = results["off"][str(n)], results["on"][str(n)]
        print(f"{f'{n} thread(s)':14} {off['per_second']:>10.0f} {on['per_second']:>10.0f} "
              f"{speedups[str(n)]:>7.2f} {off['p50_ms']:>8.2f} {on['p50_ms']:>8.2f} "
              f"{off['p99_ms']:>8.2f} {on['p99_ms']:>8.2f}")
    for t in targets:
        print(f"{t['name']}: {t['value']:.2f} (target {t['target']}) "
              f"{'met' if t['met'] else 'MISSED'}")
    print(json.dumps({
        "bench": "puts", "quick": args.quick, "rounds": rounds, "requests": requests,
        "results": results, "throughput_ratio": speedups,
        "single_p50_ratio": round(latency, 3),
        "single_p50_ratio_rounds": [round(r, 3) for r in ratios(1, "p50_ms")],
        "targets": targets,
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

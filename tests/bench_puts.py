"""Benchmark: durable secret puts through Nexus, group commit on against off (today's).

    python -m tests.bench_puts [--quick] [--requests N] [--rounds N] [--threads 4,16,32]

Two Nexus processes on SQLite (WAL, ``synchronous=FULL``), each on its own data directory:
one with ``--group-commit off`` (every put its own transaction and fsync, as before group
commit existed) and one with the default ``--group-commit on``. The client is as in
``tests.bench_secrets``: gRPC threads, one mTLS channel each, Pilot's SVID from the dev
agent; every put writes a new path (so each is a real insert, not a CAS retry). Each round
runs every load (one thread first, for latency, before any concurrent load has left work
behind in a server; then each thread count) against both servers and the echo server,
the order alternating from round to round (off first in even rounds, on first in odd ones),
so a drift of this shared machine favours neither. Throughputs and latencies are medians
over the rounds; each ratio is the median of the per-round ratios.

Each round also measures, in process and without gRPC, the store alone (4 threads of
``SqliteStore.put_secret``, group commit off against on) and the latency of one ``fsync``
of a small write in the benchmark's directory: what a durable commit costs on this disk at
that moment, which decides how much there is for group commit to share.

The same rounds also run the bare gRPC echo server of ``tests.bench_secrets`` (same mTLS,
same SVIDs, same worker pool, a request of a put's size): no Nexus at all, so its rate is
the ceiling any put could reach on this machine with these client threads, and
``echo / today`` bounds the speed-up group commit could possibly show end to end.

Targets: 4-thread put throughput with group commit / without >= 3; single-writer p50
latency with group commit / without <= 1.05 (a lone writer takes the lead at once: the
queue adds two uncontended lock round trips, microseconds against a put of a millisecond
or more, and 5 % is below the round-to-round spread of this machine). The last stdout line
is one JSON object with every sample and the targets (``tests/bench.py`` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from nexus.store.sqlite import SqliteStore
from spike.v1 import secrets_pb2, secrets_pb2_grpc
from tests.bench_secrets import ECHO_METHOD, SECRET, run_load, seed_nexus, start_echo, stop_echo
from tests.harness import DevAgent, Nexus, short_tmpdir

MODES = ("off", "on")
LOADS = (*MODES, "echo")


def put_call(tag: str) -> Callable[[grpc.Channel, int, int], Callable[[], Any]]:
    """A load whose call ``i`` of thread ``t`` writes a path of its own under ``tag``."""

    def make(ch: grpc.Channel, t: int, i: int) -> Callable[[], Any]:
        s = secrets_pb2_grpc.SecretsStub(ch)
        req = secrets_pb2.PutSecretRequest(path=f"bench/{tag}/t{t}/r{i}", data=SECRET)
        return lambda: s.Put(req, timeout=60)

    return make


def echo_call(tag: str) -> Callable[[grpc.Channel, int, int], Callable[[], Any]]:
    """The echo server's call with the bytes a put of ``put_call(tag)`` would send."""

    def make(ch: grpc.Channel, t: int, i: int) -> Callable[[], Any]:
        method = ch.unary_unary(ECHO_METHOD, request_serializer=None,
                                response_deserializer=None)
        req = secrets_pb2.PutSecretRequest(path=f"bench/{tag}/t{t}/r{i}",
                                           data=SECRET).SerializeToString()
        return lambda: method(req, timeout=60)

    return make


def store_rate(directory: Path, group_commit: bool, threads: int, puts: int) -> float:
    """Puts per second of ``threads`` threads on a fresh store (no gRPC, no crypto)."""
    db = directory / f"store-{group_commit}-{time.monotonic_ns()}.db"
    store = SqliteStore.open(db, group_commit=group_commit)
    blob = b"\x01\x00\x00\x00\x01" + b"x" * 180
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        start.wait()
        for i in range(puts):
            store.put_secret(f"s/t{t}/r{i}", cas=None, max_versions=10, now=1.0,
                             seal=lambda _v: (1, blob))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    store.close()
    for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock")):
        name.unlink(missing_ok=True)
    return threads * puts / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, *load: Any) -> dict[str, float]:
    """``run_load(*load)``'s figures plus the server's CPU milliseconds per call."""
    before = cpu_seconds(pid)
    sample = run_load(*load)
    sample["server_cpu_ms"] = (cpu_seconds(pid) - before) * 1000 / sample["requests"]
    return sample


def fsync_ms(directory: Path, samples: int = 30) -> float:
    """Median latency of one small write + fsync in ``directory``, in ms."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    took = []
    try:
        for i in range(samples):
            os.pwrite(fd, b"x" * 512, 512 * i)
            began = time.perf_counter()
            os.fsync(fd)
            took.append((time.perf_counter() - began) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(took)


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
        "server_cpu_ms": round(statistics.median(r["server_cpu_ms"] for r in runs), 3),
    }


def target(name: str, value: float, op: str, bound: float) -> dict[str, Any]:
    met = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": round(value, 3), "target": f"{op} {bound}", "met": met}


class Samples:
    """Every run of one benchmark invocation."""

    def __init__(self, loads: list[int]) -> None:
        self.loads = loads
        self.grpc: dict[str, dict[int, list[dict[str, float]]]] = {
            m: {n: [] for n in loads} for m in LOADS}
        self.store: dict[str, list[float]] = {m: [] for m in MODES}
        self.fsyncs: list[float] = []


def measure(samples: Samples, rounds: int, requests: int) -> None:
    """Start the servers, run the alternating rounds into ``samples``, stop everything."""
    agent = DevAgent()
    dirs: dict[str, Path] = {}
    servers: dict[str, Nexus] = {}
    echo = None
    scratch = short_tmpdir("nxps-")
    try:
        material = None
        for mode in MODES:
            dirs[mode] = short_tmpdir(f"nxp{mode}-")
            servers[mode] = Nexus(dirs[mode], agent.env("nexus"),
                                  args=["--group-commit", mode])
            material, _ = seed_nexus(agent, servers[mode])
        assert material is not None
        echo, echo_address = start_echo(agent, secrets_pb2.PutSecretResponse(
            path="bench/r0x4/t0/r0", version=1).ByteSize())
        for index in range(rounds):
            order = LOADS if index % 2 == 0 else LOADS[::-1]
            samples.fsyncs.append(fsync_ms(scratch))
            for mode in MODES if index % 2 == 0 else MODES[::-1]:
                samples.store[mode].append(store_rate(scratch, mode == "on", 4, requests))
            for threads in samples.loads:
                for mode in order:
                    n = requests if threads > 1 else max(requests // 2, 30)
                    tag = f"r{index}x{threads}"
                    address, pid, call = (
                        (echo_address, echo.pid, echo_call(tag)) if mode == "echo" else
                        (servers[mode].address, servers[mode].proc.pid, put_call(tag)))
                    samples.grpc[mode][threads].append(measured(
                        pid, address, material, threads, n, call))
    finally:
        stop_echo(echo)
        for server in servers.values():
            server.stop()
        agent.stop()
        for d in (scratch, *dirs.values()):
            shutil.rmtree(d, ignore_errors=True)


def summary(samples: Samples) -> dict[str, Any]:
    """Medians, ratios and targets (the JSON line, without its header fields)."""
    grpc_runs, loads = samples.grpc, samples.loads

    def ratios(threads: int, key: str, over: str = "on") -> list[float]:
        return [a[key] / b[key] for b, a in zip(grpc_runs["off"][threads],
                                                 grpc_runs[over][threads], strict=True)]

    speedups = {str(n): round(statistics.median(ratios(n, "per_second")), 3) for n in loads}
    latency = statistics.median(ratios(1, "p50_ms"))
    store_ratio = statistics.median(
        on / off for off, on in zip(samples.store["off"], samples.store["on"], strict=True))
    targets = []
    if 4 in loads:
        targets.append(target("durable puts, group commit / today's 4-thread",
                              speedups["4"], ">=", 3.0))
    targets.append(target("single-writer p50 latency, group / today", latency, "<=", 1.05))
    return {
        "results": {m: {str(n): merged(grpc_runs[m][n]) for n in loads} for m in LOADS},
        "throughput_ratio": speedups,
        "echo_ceiling_ratio": {str(n): round(statistics.median(
            ratios(n, "per_second", "echo")), 3) for n in loads},
        "single_p50_ratio": round(latency, 3),
        "single_p50_ratio_rounds": [round(r, 3) for r in ratios(1, "p50_ms")],
        "store_4_threads": {m: [round(x, 1) for x in samples.store[m]] for m in MODES},
        "store_4_threads_ratio": round(store_ratio, 3),
        "fsync_ms_rounds": [round(x, 3) for x in samples.fsyncs],
        "targets": targets,
    }


def print_table(out: dict[str, Any], loads: list[int]) -> None:
    results = out["results"]
    print(f"{'load':12} {'off req/s':>10} {'on req/s':>9} {'on/off':>7} {'echo req/s':>11} "
          f"{'echo/off':>9} {'off p50':>8} {'on p50':>8} {'off p99':>8} {'on p99':>8} "
          f"{'server CPU ms/call off/on/echo':>31}")
    for n in loads:
        off, on, ech = (results[m][str(n)] for m in LOADS)
        cpu = "/".join(f"{r['server_cpu_ms']:.2f}" for r in (off, on, ech))
        print(f"{f'{n} thread(s)':12} {off['per_second']:>10.0f} {on['per_second']:>9.0f} "
              f"{out['throughput_ratio'][str(n)]:>7.2f} {ech['per_second']:>11.0f} "
              f"{out['echo_ceiling_ratio'][str(n)]:>9.2f} {off['p50_ms']:>8.2f} "
              f"{on['p50_ms']:>8.2f} {off['p99_ms']:>8.2f} {on['p99_ms']:>8.2f} {cpu:>31}")
    store = out["store_4_threads"]
    print(f"store alone, 4 threads (no gRPC): off {statistics.median(store['off']):.0f}/s, "
          f"on {statistics.median(store['on']):.0f}/s, on/off "
          f"{out['store_4_threads_ratio']:.2f}; fsync "
          f"{statistics.median(out['fsync_ms_rounds']):.2f} ms (rounds: "
          f"{' '.join(f'{x:.2f}' for x in out['fsync_ms_rounds'])})")
    for t in out["targets"]:
        print(f"{t['name']}: {t['value']:.2f} (target {t['target']}) "
              f"{'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = sorted({int(x) for x in args.threads.split(",") if x.strip()} - {1})
    requests = args.requests or (60 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 6)
    samples = Samples([1, *counts])
    measure(samples, rounds, requests)
    out = summary(samples)
    print(f"\n{'quick' if args.quick else 'full'} run: {rounds} rounds, {requests} puts per "
          "thread per load")
    print_table(out, samples.loads)
    print(json.dumps({"bench": "puts", "quick": args.quick, "rounds": rounds,
                      "requests": requests, **out}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

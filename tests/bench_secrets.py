"""Benchmark: secret get through Nexus next to a bare gRPC echo server with the same mTLS.

    python -m tests.bench_secrets [--quick] [--threads N] [--requests N] [--rounds N]
                                  [--caller superuser|workload]

Both servers are separate processes presenting the same Nexus SVID, requiring client
certificates against the same trust bundle, with the same worker pool size. The echo server
answers a unary call with a payload of the same size as Nexus's GetSecretResponse; the client
side (threads, channels, one channel per thread, the Pilot SVID) is identical. Also measures
put throughput with durable commits (SQLite WAL, synchronous=FULL). Echo and get runs
alternate over several rounds (echo first in even rounds, get first in odd ones); throughputs
and latencies are medians over the rounds and the ratio is the median of the per-round
get/echo ratios. Every get reads the same secret, so
Nexus answers from its ciphertext row cache (as a hot secret would be); the decryption,
policy check and audit line still happen per call. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from spike.identity import SvidMaterial, fetch_svid
from spike.tls import client_channel
from spike.v1 import policies_pb2, policies_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tests.benchkit import target
from tests.harness import PY, TEST_PASSWORD, DevAgent, Nexus, base_env, pilot, short_tmpdir

TLS_NAME = "nexus.spike.internal"
ECHO_METHOD = "/bench.Echo/Echo"
WORKERS = 32  # same as Nexus's default --workers
SECRET = {"username": "service-account", "password": "x" * 64, "url": "postgres://db:5432/app"}
SECRET_PATH = "bench/app/db"  # noqa: S105 - a path, not a password
# What an echo call sends: the bytes of the get request, so both loads send the same.
ECHO_REQUEST = secrets_pb2.GetSecretRequest(path=SECRET_PATH).SerializeToString()


# ---------------------------------------------------------------- echo server (subprocess)


def serve_echo(socket_uri: str, reply_size: int) -> None:
    """Run the bare echo server until stdin closes; prints its port on stdout."""
    material = fetch_svid(socket_uri)
    credentials = grpc.ssl_server_credentials(
        [(material.private_key_pem, material.cert_chain_pem)],
        root_certificates=material.bundle_pem, require_client_auth=True)
    reply = b"\x00" * reply_size

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS),
                         handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(1).wait()


# ---------------------------------------------------------------- client side


def run_load(address: str, material: SvidMaterial, threads: int, requests: int,
             make_call: Callable[[grpc.Channel, int, int], Callable[[], Any]]) -> dict[str, float]:
    """``threads`` threads, one channel each, ``requests`` calls each; latencies in ms."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    ready = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        channel = client_channel(address, material, TLS_NAME)
        try:
            warm = make_call(channel, index, -1)
            for _ in range(20):
                warm()
            calls = [make_call(channel, index, i) for i in range(requests)]
            ready.wait()
            own = latencies[index]
            for call in calls:
                began = time.perf_counter()
                call()
                own.append((time.perf_counter() - began) * 1000)
            done.wait()
        finally:
            channel.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait()
    began = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - began
    for t in pool:
        t.join()
    flat = sorted(x for per in latencies for x in per)
    return {
        "requests": len(flat),
        "seconds": elapsed,
        "per_second": len(flat) / elapsed,
        "p50_ms": statistics.median(flat),
        "p99_ms": flat[min(len(flat) - 1, int(len(flat) * 0.99))],
    }


# ---------------------------------------------------------------- set-up shared with probe_get_cpu


def seed_nexus(agent: DevAgent, nexus: Nexus,
               caller: str = "superuser") -> tuple[SvidMaterial, int]:
    """Initialize Nexus and store the benchmark's secret. For ``caller="workload"``, also a
    policy that lets the dev agent's workload read and write under ``bench/``. Returns the
    SVID the loads use and the size of a ``GetSecretResponse`` (the echo reply size)."""
    init = pilot(["init", "--password-stdin"], agent.env("pilot"), nexus,
                 stdin=TEST_PASSWORD + "\n")
    if init.returncode != 0:
        raise SystemExit(f"init failed: {init.stderr}")
    material = fetch_svid(agent.socket("pilot"))
    channel = client_channel(nexus.address, material, TLS_NAME)
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        stub.Put(secrets_pb2.PutSecretRequest(path=SECRET_PATH, data=SECRET), timeout=30)
        reply_size = stub.Get(secrets_pb2.GetSecretRequest(path=SECRET_PATH),
                              timeout=30).ByteSize()
        if caller == "workload":
            # Reads and writes under bench/ through a policy, as an application would.
            policies_pb2_grpc.PoliciesStub(channel).Put(policies_pb2.PutPolicyRequest(
                policy=policies_pb2.Policy(
                    name="bench", spiffe_id_pattern=r"spiffe://spike\.internal/workload/demo",
                    path_pattern=r"bench/.*",
                    permissions=[policies_pb2.PERMISSION_READ, policies_pb2.PERMISSION_WRITE])),
                timeout=30)
            material = fetch_svid(agent.socket("workload"))
    finally:
        channel.close()
    return material, reply_size


def start_echo(agent: DevAgent, reply_size: int) -> tuple[subprocess.Popen[str], str]:
    """The bare echo server as a subprocess with Nexus's SVID; returns it and its address."""
    echo = subprocess.Popen(
        [PY, "-m", "tests.bench_secrets", "--echo-server", agent.socket("nexus"),
         "--reply-size", str(reply_size)],
        env=base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    return echo, f"127.0.0.1:{int(echo.stdout.readline())}"


def stop_echo(echo: subprocess.Popen[str] | None) -> None:
    if echo is not None:
        assert echo.stdin is not None
        echo.stdin.close()  # the server stops when its stdin closes
        echo.wait(10)


def get_call(ch: grpc.Channel, _t: int, _i: int) -> Callable[[], Any]:
    s = secrets_pb2_grpc.SecretsStub(ch)
    req = secrets_pb2.GetSecretRequest(path=SECRET_PATH)
    return lambda: s.Get(req, timeout=30)


def echo_call(ch: grpc.Channel, _t: int, _i: int) -> Callable[[], Any]:
    method = ch.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)
    return lambda: method(ECHO_REQUEST, timeout=30)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_secrets")
    parser.add_argument("--quick", action="store_true", help="small N (a smoke run)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=0,
                        help="get requests per thread and round")
    parser.add_argument("--rounds", type=int, default=0, help="echo/get round pairs")
    parser.add_argument("--puts", type=int, default=0, help="put requests per thread")
    parser.add_argument("--caller", choices=("superuser", "workload"), default="superuser",
                        help="client identity for the loads: Pilot's superuser SVID (no policy "
                             "matching) or the dev agent's workload SVID through a policy")
    parser.add_argument("--echo-server", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--reply-size", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        serve_echo(args.echo_server, args.reply_size)
        return 0
    gets = args.requests or (150 if args.quick else 1000)
    puts = args.puts or (50 if args.quick else 300)

    agent = DevAgent()
    data_dir = short_tmpdir("nxb-")
    # Cheap Argon2id only for the one-time init: it plays no part in get/put.
    nexus = Nexus(data_dir, agent.env("nexus"))
    echo: subprocess.Popen[str] | None = None
    try:
        material, reply_size = seed_nexus(agent, nexus, args.caller)
        echo, echo_address = start_echo(agent, reply_size)

        def put_call(ch: grpc.Channel, t: int, i: int) -> Callable[[], Any]:
            s = secrets_pb2_grpc.SecretsStub(ch)
            req = secrets_pb2.PutSecretRequest(path=f"bench/put/t{t}/r{i}", data=SECRET)
            return lambda: s.Put(req, timeout=30)

        # Interleave the runs so both servers see the same machine conditions; each round
        # pairs an echo run with a get run next to it, and the ratio quoted is the median of
        # the per-round ratios (this shared machine drifts by 30 % and more). The order
        # inside a round alternates (echo-get, get-echo, ...), so a drift during the
        # run favours neither side.
        rounds = args.rounds or (2 if args.quick else 16)
        echo_runs, get_runs = [], []
        for index in range(rounds):
            for which in (("echo", "get") if index % 2 == 0 else ("get", "echo")):
                if which == "echo":
                    echo_runs.append(run_load(echo_address, material, args.threads, gets,
                                              echo_call))
                else:
                    get_runs.append(run_load(nexus.address, material, args.threads, gets,
                                             get_call))
        put_run = run_load(nexus.address, material, args.threads, puts, put_call)

        def cold_get_call(ch: grpc.Channel, t: int, i: int) -> Callable[[], Any]:
            s = secrets_pb2_grpc.SecretsStub(ch)
            req = secrets_pb2.GetSecretRequest(path=f"bench/put/t{t}/r{max(i, 0)}")
            return lambda: s.Get(req, timeout=30)

        # Each secret the put run wrote, read once (the warm-up reads r0): all but a few
        # miss the row cache, so this is the SQLite read path.
        cold_run = run_load(nexus.address, material, args.threads, puts, cold_get_call)
        put_single = run_load(nexus.address, material, 1, puts, put_call)
    finally:
        stop_echo(echo)
        nexus.stop()
        agent.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    def merged(runs: list[dict[str, float]]) -> dict[str, Any]:
        """Median throughput and latencies over the rounds, plus every round's rate."""
        return {
            "requests": sum(r["requests"] for r in runs),
            "per_second": statistics.median(r["per_second"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "per_second_runs": [round(r["per_second"], 1) for r in runs],
        }

    echo_r, get_r = merged(echo_runs), merged(get_runs)
    ratios = [g["per_second"] / e["per_second"] for e, g in zip(echo_runs, get_runs,
                                                                 strict=True)]
    ratio = statistics.median(ratios)
    rows = [
        ("echo (bare gRPC, same mTLS)", echo_r),
        ("secret get (Nexus, SQLite)", get_r),
        (f"secret get, cold (x{args.threads})", cold_run),
        (f"secret put x{args.threads} (durable)", put_run),
        ("secret put x1 (durable)", put_single),
    ]
    print(f"\nclient threads: {args.threads} as {args.caller}; payload {reply_size} B; "
          f"{'quick' if args.quick else 'full'} run")
    print(f"{'workload':34} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows:
        print(f"{name:34} {int(r['requests']):>9} {r['per_second']:>9.0f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
    print(f"get / echo throughput ratio: {ratio:.2f} (target >= 0.70), median of {rounds} "
          f"rounds (quartiles {quartiles[0]:.2f} / {quartiles[2]:.2f}): "
          f"{' '.join(f'{r:.2f}' for r in ratios)}")
    print(json.dumps({
        "bench": "secrets", "quick": args.quick, "threads": args.threads, "caller": args.caller,
        "payload_bytes": reply_size,
        "echo": {k: round(v, 3) if isinstance(v, float) else v for k, v in echo_r.items()},
        "get": {k: round(v, 3) if isinstance(v, float) else v for k, v in get_r.items()},
        "get_cold": {k: round(v, 3) for k, v in cold_run.items()},
        "put_concurrent": {k: round(v, 3) for k, v in put_run.items()},
        "put_single": {k: round(v, 3) for k, v in put_single.items()},
        "get_echo_ratio": round(ratio, 3),
        "get_echo_ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "get_echo_ratio_rounds": [round(r, 3) for r in ratios],
        "rounds": rounds, "target_ratio": 0.7,
        "target_met": {"get_echo_ratio": ratio >= 0.7},
        "targets": [target("secret get / bare gRPC echo, 4 threads", ratio, ">=", 0.7)],
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

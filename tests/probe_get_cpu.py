"""Diagnostic: server CPU and context switches per call, Nexus get vs bare echo vs health.

    python -m tests.probe_get_cpu [--rounds N] [--requests N]

Not a benchmark with a target (``make bench`` does not run it): it explains the get/echo ratio
of ``tests.bench_secrets``. Same set-up as that benchmark (same processes, SVIDs, client
threads); around each load run it reads the server process's CPU time (``/proc/PID/stat``)
and the voluntary/involuntary context switches of all its threads
(``/proc/PID/task/*/status``), and divides by the number of calls. ``health`` is
``grpc.health.v1.Health/Check`` through Nexus: the same interceptors and gRPC server set-up
as a get, without the servicer's work.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.bench_secrets import echo_call, get_call, run_load, seed_nexus, start_echo, stop_echo
from tests.harness import DevAgent, Nexus, short_tmpdir


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except OSError:
            continue  # a thread ended meanwhile
    return voluntary, involuntary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.probe_get_cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1500, help="per thread and run")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)

    agent = DevAgent()
    data_dir = short_tmpdir("nxc-")
    nexus = Nexus(data_dir, agent.env("nexus"))
    echo: subprocess.Popen[str] | None = None
    try:
        material, reply_size = seed_nexus(agent, nexus)
        echo, echo_address = start_echo(agent, reply_size)

        def health_call(ch: grpc.Channel, _t: int, _i: int) -> Callable[[], Any]:
            s = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="")
            return lambda: s.Check(req, timeout=30)

        print(f"{'run':8} {'calls/s':>8} {'server CPU us/call':>19} {'client CPU us/call':>19} "
              f"{'vol. cs/call':>13} {'invol. cs/call':>15}")
        for _ in range(args.rounds):
            for name, address, pid, call in (
                    ("echo", echo_address, echo.pid, echo_call),
                    ("get", nexus.address, nexus.proc.pid, get_call),
                    ("health", nexus.address, nexus.proc.pid, health_call)):
                cpu0, own0, cs0 = cpu_seconds(pid), os.times(), context_switches(pid)
                result = run_load(address, material, args.threads, args.requests, call)
                cpu1, own1, cs1 = cpu_seconds(pid), os.times(), context_switches(pid)
                calls = result["requests"]
                client = (own1.user - own0.user) + (own1.system - own0.system)
                print(f"{name:8} {result['per_second']:>8.0f} "
                      f"{1e6 * (cpu1 - cpu0) / calls:>19.0f} {1e6 * client / calls:>19.0f} "
                      f"{(cs1[0] - cs0[0]) / calls:>13.1f} {(cs1[1] - cs0[1]) / calls:>15.1f}",
                      flush=True)
    finally:
        stop_echo(echo)
        nexus.stop()
        agent.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

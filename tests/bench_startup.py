"""Benchmark: start-up of the real programs, next to the interpreter alone.

    python -m tests.bench_startup            # 9 runs of each
    python -m tests.bench_startup --quick    # 3 runs of each

Every figure is wall time of a real process started from this one, measured from just before
the exec, in alternating rounds with ``python -c pass`` (the same interpreter, the same
environment) so that the baseline sees the same machine load:

- ``spike-nexus`` until a Status RPC answers: the console script (``python -m nexus`` when it
  is not installed) on SQLite, with the dev agent serving its SVID and production Argon2id
  parameters. This process polls the port with TCP connects (every 2 ms) and, once one is
  accepted, sends a Status RPC over mTLS as Pilot's identity (a bare grpc channel) and waits
  for the answer. Two stores: an initialised one (the restart of a running deployment, which
  comes up sealed; the target) and a new data directory (the first start);
- ``spike status`` cold: a new Pilot process against a running, unsealed Nexus, exec to exit;
- ``spike --help``: exec to exit.

Before measuring, the project's packages are byte-compiled (``compileall``), as ``pip install``
does: an installed SPIKE starts from ``__pycache__``, while a source tree under
``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module at every start. One warm-up
run of each program (not counted) fills the page cache.

Prints a table and, as the last line, one JSON object with the targets and every sample.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spike.identity import SvidMaterial, fetch_svid
from spike.tls import DEFAULT_TLS_NAME, client_channel
from spike.v1 import operator_pb2 as pb
from spike.v1.operator_pb2_grpc import OperatorStub
from tests.harness import PY, ROOT, TEST_PASSWORD, DevAgent, Nexus, pilot, short_tmpdir

TARGETS = {"nexus": 0.5, "status": 0.35, "help": 0.15}
POLL = 0.002
TIMEOUT = 120.0


def nexus_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m nexus``."""
    script = Path(sys.executable).parent / "spike-nexus"
    return [str(script)] if script.exists() else [PY, "-m", "nexus"]


def pilot_command() -> list[str]:
    script = Path(sys.executable).parent / "spike"
    return [str(script)] if script.exists() else [PY, "-m", "pilot"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CPU: dict[tuple[str, ...], list[float]] = {}  # CPU seconds (user + sys) of each run, by command


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_to_exit(args: Sequence[str], env: Mapping[str, str]) -> float:
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    done = subprocess.run(args, env=dict(env), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=TIMEOUT, check=False)
    elapsed = time.perf_counter() - t0
    CPU.setdefault(tuple(args[-1:]), []).append(_children_cpu() - cpu0)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed


def wait_accepting(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"spike-nexus exited {proc.returncode} before listening")
        if time.perf_counter() > deadline:
            raise RuntimeError("spike-nexus did not listen in time")
        time.sleep(POLL)


def status_answered(port: int, material: SvidMaterial) -> int:
    channel = client_channel(f"127.0.0.1:{port}", material, DEFAULT_TLS_NAME)
    try:
        resp = OperatorStub(channel).Status(pb.StatusRequest(), timeout=30, wait_for_ready=True)
        return int(resp.state)
    finally:
        channel.close()


def nexus_to_status(data_dir: Path, env: Mapping[str, str], material: SvidMaterial) -> float:
    """Exec of spike-nexus on ``data_dir`` until a Status RPC answers; then SIGTERM."""
    for _ in range(5):  # another process may take the free port first
        port = free_port()
        args = [*nexus_command(), "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, env=dict(env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_accepting(port, proc, t0 + TIMEOUT)
            status_answered(port, material)
            elapsed = time.perf_counter() - t0
        except RuntimeError:
            if proc.poll() is not None and proc.returncode == 1:
                continue  # port taken: try another
            raise
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        return elapsed
    raise RuntimeError("spike-nexus could not get a free port")


def byte_compile() -> None:
    for package in ("spike", "nexus", "pilot", "devagent"):
        compileall.compile_dir(ROOT / package, quiet=1)


def alternate(n: int, measures: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """``n`` rounds, each measure once per round in turn, after one uncounted warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for measure in measures.values():
        measure()
    for _ in range(n):
        for name, measure in measures.items():
            samples[name].append(measure())
    return samples


def initialised_dir(agent: DevAgent) -> tuple[Path, Nexus]:
    """A data directory that holds an initialised store; the Nexus that made it (unsealed)."""
    data_dir = short_tmpdir("bsu-")
    running = Nexus(data_dir, agent.env("nexus"), insecure_kdf=False)
    result = pilot(["init", "--password-stdin"], agent.env("pilot"), running,
                   stdin=TEST_PASSWORD + "\n")
    if result.returncode != 0:
        raise RuntimeError(f"spike init failed: {result.stderr}")
    return data_dir, running


def measure(n: int) -> dict[str, list[float]]:
    byte_compile()
    agent = DevAgent()
    baseline = [PY, "-c", "pass"]
    env = agent.env("nexus")
    made: list[Path] = []
    try:
        material = fetch_svid(agent.socket("pilot"))
        data_dir, running = initialised_dir(agent)
        made.append(data_dir)
        pilot_env = dict(agent.env("pilot"), SPIKE_NEXUS_ADDR=running.address)
        try:
            status_samples = alternate(n, {
                "baseline": lambda: run_to_exit(baseline, env),
                "status": lambda: run_to_exit([*pilot_command(), "status"], pilot_env),
                "help": lambda: run_to_exit([*pilot_command(), "--help"], pilot_env),
            })
        finally:
            running.stop()

        def fresh() -> float:
            made.append(short_tmpdir("bsn-"))
            return nexus_to_status(made[-1], env, material)

        nexus_samples = alternate(n, {
            "baseline_nexus": lambda: run_to_exit(baseline, env),
            "nexus_sealed": lambda: nexus_to_status(data_dir, env, material),
            "nexus_new": fresh,
        })
    finally:
        agent.stop()
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
    return {**status_samples, **nexus_samples}


def target(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"name": name, "value": round(value, 4), "target": f"<= {limit}",
            "met": value <= limit}


def report(samples: dict[str, list[float]], n: int) -> dict[str, Any]:
    med = {name: statistics.median(values) for name, values in samples.items()}
    rows = [
        ("spike-nexus exec to status answer (s)", "nexus_sealed", "baseline_nexus", "nexus"),
        ("spike-nexus exec to status answer, new data dir (s)", "nexus_new", "baseline_nexus",
         "nexus"),
        ("spike status cold (s)", "status", "baseline", "status"),
        ("spike --help (s)", "help", "baseline", "help"),
    ]
    targets = [target(name, med[key], TARGETS[limit]) for name, key, _, limit in rows]
    over_baseline = {name: round(med[key] - med[base], 4) for name, key, base, _ in rows}
    print(f"{'measure':55} {'median':>8} {'- python -c pass':>17} {'target':>8}")
    for (name, key, base, limit), t in zip(rows, targets, strict=True):
        shown = f"<= {TARGETS[limit]}"
        print(f"{name:55} {med[key]:8.3f} {med[key] - med[base]:17.3f} {shown:>8}"
              f"  {'met' if t['met'] else 'NOT met'}")
    print(f"python -c pass: {med['baseline']:.3f} s (status round), "
          f"{med['baseline_nexus']:.3f} s (nexus round)")
    cpu = {" ".join(k): statistics.median(v) for k, v in CPU.items()}
    print("CPU (user + sys) medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in cpu.items()))
    return {
        "benchmark": "startup",
        "runs": n,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "medians": {k: round(v, 4) for k, v in med.items()},
        "over_baseline": over_baseline,
        "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        # CPU time of the processes run to exit (warm-up included): on a busy machine wall
        # times grow, these much less.
        "cpu_medians": {" ".join(k): round(statistics.median(v), 4) for k, v in CPU.items()},
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs of each instead of 9")
    args = parser.parse_args(argv)
    n = 3 if args.quick else 9
    doc = report(measure(n), n)
    print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

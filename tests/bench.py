"""`make bench`: run every benchmark module, then print a summary table.

    python -m tests.bench            # full sizes
    python -m tests.bench --quick    # CI sizes (--quick is passed to every module)
    python -m tests.bench --only rotation --only keys

Runs ``tests/bench_keys.py``, ``tests/bench_secrets.py``, ``tests/bench_rotation.py`` and any
other ``tests/bench_*.py`` that exists, each as ``python -m tests.bench_X [--quick]`` in its own
process (one after the other: they measure against baselines taken in the same run, and
running them side by side on a 2-core machine would spoil both). A module that does not exist
yet is reported as missing, not as a failure. Each module's output is streamed as it comes;
its last line, when it is a JSON object, gives the summary: its ``"targets"`` entries
(``tests/benchkit.py``) are printed at the end, each value next to its target. Exits 1 if a
module failed or, at full sizes, if any target was missed (``--quick`` sizes only report).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KNOWN = ("bench_startup", "bench_keys", "bench_secrets", "bench_puts", "bench_import",
         "bench_rotation_e2e", "bench_rotation")


def discover() -> list[str]:
    found = {p.stem for p in HERE.glob("bench_*.py")}
    return [m for m in KNOWN] + sorted(found - set(KNOWN))


def run_module(module: str, quick: bool) -> tuple[int, float, dict[str, Any] | None]:
    args = [sys.executable, "-m", f"tests.{module}", *(["--quick"] if quick else [])]
    print(f"\n=== {' '.join(['python', *args[1:]])}", flush=True)
    t0 = time.perf_counter()
    last_json: dict[str, Any] | None = None
    with subprocess.Popen(args, cwd=HERE.parent, stdout=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            text = line.strip()
            if text.startswith("{"):
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(doc, dict):
                    last_json = doc
        rc = proc.wait()
    return rc, time.perf_counter() - t0, last_json


def targets_of(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The module's target entries (see ``tests/benchkit.py``); malformed ones are skipped."""
    entries = (report or {}).get("targets")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict)
            and {"name", "value", "target", "met"} <= e.keys()]


def print_targets(rows: list[tuple[str, dict[str, Any]]]) -> None:
    print(f"\n{'module':18} {'measurement':52} {'value':>9} {'target':>9}  result")
    for module, entry in rows:
        verdict = "met" if entry["met"] else "NOT MET"
        value = entry["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{module:18} {entry['name']:52} {shown:>9} {entry['target']:>9}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every module")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only bench_NAME (repeatable)")
    args = parser.parse_args(argv)
    modules = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        modules = [m for m in modules if m in wanted] + sorted(wanted - set(modules))
    results: list[tuple[str, str, float]] = []
    targets: list[tuple[str, dict[str, Any]]] = []
    started = time.perf_counter()
    for module in modules:
        if not (HERE / f"{module}.py").exists():
            print(f"\n=== {module}: tests/{module}.py does not exist yet; skipped", flush=True)
            results.append((module, "missing", 0.0))
            continue
        rc, seconds, report = run_module(module, args.quick)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        results.append((module, status, seconds))
        targets += [(module, entry) for entry in targets_of(report)]
    total = time.perf_counter() - started

    print(f"\n=== summary ({'quick' if args.quick else 'full'} mode, {total:.0f} s)")
    print(f"{'module':16} {'status':16} {'seconds':>8}")
    for module, status, seconds in results:
        shown = f"{seconds:8.1f}" if status != "missing" else f"{'-':>8}"
        print(f"{module:16} {status:16} {shown}")
    print_targets(targets)
    failed = [m for m, status, _ in results if status.startswith("FAILED")]
    missed = [f"{m}: {e['name']}" for m, e in targets if not e["met"]]
    if failed:
        print(f"failed: {', '.join(failed)}")
    if missed and not args.quick:
        print(f"targets missed: {'; '.join(missed)}")
    elif missed:
        print("(--quick sizes are too small for the targets: misses are reported, not failed)")
    return 1 if failed or (missed and not args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())

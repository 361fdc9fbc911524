"""`make demo`: the story end to end with embedded defaults (dev agent, SQLite, temp dir)."""

from __future__ import annotations

import shutil
import sys

from tests.harness import DevAgent, Nexus, pilot, short_tmpdir


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(agent: DevAgent, nexus: Nexus, who: str, *args: str, stdin: str | None = None,
        expect: int = 0) -> str:
    print(f"$ spike {' '.join(args)}    # as {who}", flush=True)
    result = pilot(list(args), agent.env(who), nexus, stdin=stdin)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != expect:
        raise SystemExit(f"demo failed: `spike {' '.join(args)}` exited {result.returncode}, "
                         f"expected {expect}")
    return result.stdout


def main() -> int:
    data_dir = short_tmpdir("demo-")
    step("start spike-dev-agent (development only) and spike-nexus")
    agent = DevAgent()
    nexus = Nexus(data_dir, agent.env("nexus"))
    print(f"nexus listening on {nexus.address}, data in {data_dir}")
    try:
        step("status")
        run(agent, nexus, "pilot", "status")
        step("a workload may not read operator status")
        run(agent, nexus, "workload", "status", expect=4)
    finally:
        step("stop")
        print(f"nexus exited {nexus.stop()}, agent exited {agent.stop()}")
        shutil.rmtree(data_dir, ignore_errors=True)
    print("\ndemo passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

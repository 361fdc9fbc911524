"""docs/client.md's example, run as written against a real Nexus (first run creates the
secret, the second reads it)."""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.harness import PY, ROOT, DevAgent, pilot, short_tmpdir, start_unsealed


def example() -> str:
    text = (ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "docs/client.md has one Python example"
    return str(blocks[0])


def test_the_documented_example_runs(agent: DevAgent) -> None:
    code = example()
    data_dir = short_tmpdir("nxd-")
    server = start_unsealed(agent, data_dir)
    try:
        policy = re.search(r"^spike (policy put .*?)\n(?!\s)", (ROOT / "docs" / "client.md")
                           .read_text(), re.MULTILINE | re.DOTALL)
        assert policy is not None
        words = policy.group(1).replace("\\\n", " ").replace("'", "").split()
        result = pilot(words, agent.env("pilot"), server)
        assert result.returncode == 0, result.stderr
        env = agent.env("workload") | {"SPIKE_NEXUS_ADDR": server.address}
        for _ in range(2):
            run = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=120)
            assert run.returncode == 0, run.stderr
            assert run.stdout == "connecting as app\n"
            assert "change-me" not in run.stdout + run.stderr
        got = pilot(["secret", "metadata", "apps/demo/db", "--output", "json"],
                    agent.env("pilot"), server)
        assert '"current_version": 1' in got.stdout, got.stdout
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

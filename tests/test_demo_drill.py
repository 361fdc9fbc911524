"""`make demo` and `make drill` run end to end (the README's two promises)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT, base_env


@pytest.mark.parametrize("module", ["tests.demo", "tests.drill"])
def test_story_runs(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=base_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if module == "tests.demo":
        assert "demo passed" in result.stdout
        assert "hash chain intact" in result.stdout
    else:
        assert "PASSED: 16/16" in result.stdout

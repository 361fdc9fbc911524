"""`make bench` fails when a target is missed at full sizes, and only reports it at --quick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import bench
from tests.benchkit import median, target


def _fake_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                  reports: dict[str, tuple[int, dict[str, Any] | None]]) -> None:
    for name in reports:
        (tmp_path / f"{name}.py").write_text("")
    monkeypatch.setattr(bench, "HERE", tmp_path)
    monkeypatch.setattr(bench, "KNOWN", ())

    def run(module: str, quick: bool) -> tuple[int, float, dict[str, Any] | None]:
        rc, report = reports[module]
        return rc, 0.1, report

    monkeypatch.setattr(bench, "run_module", run)


def test_target_entries() -> None:
    assert target("a / b", 0.6123, ">=", 0.6) == {
        "name": "a / b", "value": 0.612, "target": ">= 0.6", "met": True}
    assert not target("t", 0.51, "<=", 0.5)["met"]
    with pytest.raises(ValueError, match="comparison"):
        target("t", 1.0, "<", 2.0)
    assert median([3.0, 1.0, 2.0]) == 2.0


@pytest.mark.parametrize(("met", "quick", "code"), [
    (True, False, 0), (False, False, 1), (False, True, 0)])
def test_a_missed_target_fails_full_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], met: bool,
                                         quick: bool, code: int) -> None:
    value = 0.7 if met else 0.4
    _fake_modules(monkeypatch, tmp_path, {
        "bench_a": (0, {"targets": [target("a / raw", value, ">=", 0.6)]}),
        "bench_b": (0, {"no_targets": True}),
    })
    assert bench.main(["--quick"] if quick else []) == code
    out = capsys.readouterr().out
    assert "a / raw" in out and ">= 0.6" in out
    assert ("met" if met else "NOT MET") in out


def test_a_failed_module_fails_even_quick(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    _fake_modules(monkeypatch, tmp_path, {"bench_a": (2, None)})
    assert bench.main(["--quick"]) == 1

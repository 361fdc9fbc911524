"""The layering and size rules of docs/architecture.md, checked on the source so they hold.

- ``pilot`` and ``devagent`` never import ``nexus``; ``spike`` (shared) imports neither.
- grpc is imported only by ``nexus/api``, ``nexus/limits.py``, ``pilot`` and ``spike``'s TLS and
  generated stubs: the core, crypto, backup and store layers know nothing of the wire.
- ``nexus/core``, ``nexus/crypto``, ``nexus/backup`` and ``nexus/store`` never import
  ``nexus/api``; crypto and store import nothing else of Nexus's.
- No function in the product code is longer than 60 lines.
- No test module imports another test module (shared helpers live in ``tests/harness.py``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("nexus", "pilot", "spike", "devagent")
MAX_FUNCTION_LINES = 60


def _sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" not in path.relative_to(ROOT).parts:  # generated stubs
                yield path


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("packages", "forbidden", "allowed"), [
    (("pilot", "devagent"), ("nexus",), ()),
    (("spike",), ("nexus", "pilot", "devagent"), ()),
    (("nexus",), ("grpc", "grpc_health", "grpc_reflection"),
     ("nexus/api/", "nexus/limits.py", "nexus/app.py", "nexus/__main__.py",
      "nexus/metrics.py")),  # metrics label RPC outcomes by gRPC status code
    (("nexus/core", "nexus/backup", "nexus/crypto", "nexus/store"), ("nexus.api",), ()),
    (("nexus/crypto",), ("nexus.core", "nexus.backup", "nexus.store", "nexus.api"), ()),
    (("nexus/store",), ("nexus.core", "nexus.backup", "nexus.crypto", "nexus.api"), ()),
])
def test_layers(packages: tuple[str, ...], forbidden: tuple[str, ...],
                allowed: tuple[str, ...]) -> None:
    bad = []
    for path in _sources(*packages):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(allowed):
            continue
        bad += [f"{rel} imports {name}" for name in sorted(_imports(path))
                if _is_under(name, forbidden)]
    assert not bad, bad


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in _sources(*PRODUCT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert not long, long


def test_no_test_module_imports_another() -> None:
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        bad += [f"{path.name} imports {name}" for name in sorted(_imports(path))
                if name.startswith("tests.test_")]
    assert not bad, bad


def test_the_import_check_sees_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom nexus.api import server\nfrom . import x\n")
    assert _imports(sample) == {"grpc", "nexus.api"}
    assert _is_under("nexus.api.server", ("nexus.api",))
    assert not _is_under("nexus.apiary", ("nexus.api",))

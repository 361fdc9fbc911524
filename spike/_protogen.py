"""Generate the gRPC/protobuf stubs in ``spike/v1`` from ``protos/``.

``python -m spike._protogen --out .`` regenerates them in place;
``python -m spike._protogen --check`` fails when the committed stubs are stale.
Generated files are never edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_DIR = Path("spike") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "spike" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into ``out``; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    (out / GENERATED_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out / GENERATED_DIR).iterdir() if p.name != "__init__.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the stubs under this project root")
    group.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    if args.out is not None:
        for path in generate(args.out):
            print(f"generated {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_dir = ROOT / GENERATED_DIR
        stale = [
            p.name
            for p in fresh
            if not (committed_dir / p.name).exists()
            or not filecmp.cmp(p, committed_dir / p.name, shallow=False)
        ]
        known = {p.name for p in fresh}
        extra = [
            p.name
            for p in committed_dir.iterdir()
            if p.suffix in {".py", ".pyi"} and p.name != "__init__.py" and p.name not in known
        ]
    if stale or extra:
        print(f"stale generated stubs: {stale + extra}; run `make protos`", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

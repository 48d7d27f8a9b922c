"""Generate the Python protobuf and gRPC modules from proto/kvpeer/v1/*.proto.

The .proto files are the source of truth for every wire message. The generated
modules are committed under kvpeer/v1/ so that the package installs without
grpcio-tools; tests/test_proto_generated.py fails when they are stale.

    python proto/generate.py           # rewrite kvpeer/v1/*_pb2*.py*
    python proto/generate.py --check   # exit 1 if they differ from proto/
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE_DIR = Path("kvpeer") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file; return the generated paths relative to out_root."""
    import grpc_tools
    from grpc_tools import protoc  # imported lazily: only developers need grpcio-tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its message above")
    return sorted(
        p.relative_to(out_root)
        for p in (out_root / PACKAGE_DIR).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_files() -> list[str]:
    """Names of generated modules that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(
            p.relative_to(REPO_ROOT)
            for p in (REPO_ROOT / PACKAGE_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        )
        stale = {str(p) for p in set(fresh) ^ set(committed)}
        for rel in set(fresh) & set(committed):
            if not filecmp.cmp(Path(tmp) / rel, REPO_ROOT / rel, shallow=False):
                stale.add(str(rel))
    return sorted(stale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name} (run: python proto/generate.py)")
        return 1 if stale else 0
    for old in (REPO_ROOT / PACKAGE_DIR).iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    for rel in generate(REPO_ROOT):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

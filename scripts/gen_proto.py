"""Regenerate the Python protobuf/gRPC code in client/corepeek/v1 from proto/.

Run from the repository root: ``python scripts/gen_proto.py``.  The output is
committed so that installing corepeek needs no protoc; a unit test checks it
is up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "client"


def generate(out_dir: Path = OUT_DIR) -> None:
    """Run protoc for every .proto under proto/ into out_dir."""
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        *sources,
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)

"""The committed protobuf code is what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is missing: install the test extras (pip install -e '.[test]')")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_proto import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    for fresh in tmp_path.rglob("*.py*"):
        committed = ROOT / "client" / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run python scripts/gen_proto.py")

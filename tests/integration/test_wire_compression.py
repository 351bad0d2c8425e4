"""Compression on the wire (CaptureOptions.compression = ZSTD) through a real agent.

The core must be byte-for-byte what an uncompressed capture gives (checked
against bigmem's known memory, and by gdb), while much less crosses the wire;
packed sparse chunks are compressed too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from elftools.elf.elffile import ELFFile

from corepeek.dump import write_full_core
from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target, bigmem_touched_pages, bigmem_words
from harness.tools import gdb_backtraces

MIB = 1024 * 1024


def _check_bigmem_pages(core: Path, ready: dict, limit: int = 256) -> None:
    addr = int(ready["addr"])
    with open(core, "rb") as f:
        seg = next(s for s in ELFFile(f).iter_segments()
                   if s.header.p_type == "PT_LOAD" and s.header.p_vaddr == addr)
        pages = bigmem_touched_pages(ready)
        for off in pages[:limit] + pages[-limit:]:
            f.seek(seg.header.p_offset + off)
            assert f.read(4096) == bigmem_words(off, 4096), f"page at +{off:#x} differs"


@pytest.mark.parametrize("args", [["-m", "48"], ["-m", "8", "-r", "32", "-s"]],
                         ids=["dense", "sparse-packed"])
def test_compressed_capture_equals_the_memory_and_loads_in_gdb(
        agent, build, require_root, tmp_path: Path, args: list[str]) -> None:
    with Target(build("bigmem"), args) as t:
        out = tmp_path / "core"
        with open_capture(agent.address, t.pid, compression="zstd") as core:
            assert core.layout.compression == pb.COMPRESSION_ZSTD
            write_full_core(core, out)
            stats = core.stats
        assert stats.data_bytes >= 8 * MIB
        assert stats.wire_bytes < stats.data_bytes // 4, stats     # bigmem's words compress ~10x
        _check_bigmem_pages(out, t.ready)
        assert "main" in gdb_backtraces(out, build("bigmem"))[t.pid]
        assert_thawed_and_undisturbed(t)


def test_cli_dump_with_wire_compression_reports_both_sizes(agent, build, require_root,
                                                          tmp_path: Path) -> None:
    with Target(build("bigmem"), ["-m", "16"]) as t:
        out = tmp_path / "cli.core"
        res = subprocess.run([sys.executable, "-m", "corepeek", "dump", "--agent", agent.address,
                              str(t.pid), "-o", str(out), "--wire-compression", "zstd"],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert "compressed)" in res.stderr, res.stderr
        _check_bigmem_pages(out, t.ready)
        assert_thawed_and_undisturbed(t)


def test_unknown_compression_is_invalid_argument_and_freezes_nothing(agent, build,
                                                                     require_root) -> None:
    with Target(build("threads")) as t:
        with grpc.insecure_channel(agent.address) as ch:
            opts = pb.CaptureOptions(compression=7)          # not a Compression value
            call = pb_grpc.CoreCaptureServiceStub(ch).Capture(
                iter([pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid, options=opts))]),
                timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                next(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "compression" in (err.value.details() or "")
        assert_thawed_and_undisturbed(t)

"""CoreFileWriter on real file systems: exact bytes, sparse holes, direct I/O
where it applies, page cache where it must, and disk-full errors that reach
the caller."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corepeek.diskwriter import DIRECT_ALIGN, CoreFileWriter, WriteStats
from corepeek.dump import write_full_core
from corepeek.remote import Piece

MIB = 1024 * 1024
PAGE = 4096


def _pattern(offset: int, length: int) -> bytes:
    """Bytes that differ at every position of the file (a misplaced write shows)."""
    first = offset // 8
    words = range(first, (offset + length + 7) // 8 + 1)
    raw = b"".join((w | 0xC0DE000000000000).to_bytes(8, "little") for w in words)
    skip = offset - first * 8
    return raw[skip:skip + length]


def _write(path: Path, size: int, pieces: list[tuple[int, int]], **opts: object) -> WriteStats:
    with CoreFileWriter(path, **opts) as w:     # type: ignore[arg-type]
        for off, n in pieces:
            w.write(off, _pattern(off, n))
        w.finish(size)
        return w.stats


def _check(path: Path, size: int, pieces: list[tuple[int, int]]) -> None:
    want = bytearray(size)
    for off, n in pieces:
        want[off:off + n] = _pattern(off, n)
    got = path.read_bytes()
    assert len(got) == size
    if got != want:
        bad = next(i for i in range(size) if got[i] != want[i])
        raise AssertionError(f"first wrong byte at {bad:#x}")


def _page_cache_bytes(path: Path) -> int:
    """Bytes of path resident in the page cache, as util-linux fincore reports them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_given_a_dense_aligned_core_when_written_then_it_goes_direct_and_is_exact(
        tmp_path: Path) -> None:
    size = 24 * MIB
    pieces = [(off, MIB) for off in range(0, size, MIB)]
    out = tmp_path / "core"
    stats = _write(out, size, pieces, spill=False)
    _check(out, size, pieces)
    assert stats.direct_fallback == ""
    assert stats.direct_bytes == size and stats.buffered_bytes == 0
    assert stats.direct_writes == size // (4 * MIB)      # coalesced into full staging buffers


def test_given_headers_notes_and_odd_pieces_when_written_then_each_lands_where_it_belongs(
        tmp_path: Path) -> None:
    size = 16 * MIB
    pieces = [
        (0, 5000),                           # ELF header and notes: unaligned, small
        (PAGE * 2, 3 * MIB + 100),           # aligned start, unaligned tail
        (PAGE * 2 + 3 * MIB + 100, 300),     # continues in the same page
        (4 * MIB, 64 * 1024),                # short: page cache
        (5 * MIB + 512, MIB),                # unaligned start: page cache
        (8 * MIB, 2 * MIB),                  # direct, then a hole to the end
    ]
    out = tmp_path / "core"
    stats = _write(out, size, pieces, spill=False)
    _check(out, size, pieces)
    assert stats.direct_bytes == 3 * MIB + 2 * MIB
    assert stats.buffered_bytes == 5000 + 100 + 300 + 64 * 1024 + MIB
    assert out.stat().st_blocks * 512 < 8 * MIB                          # the holes stay holes


def test_given_direct_io_disabled_when_written_then_everything_uses_the_page_cache(
        tmp_path: Path) -> None:
    pieces = [(0, 4 * MIB)]
    out = tmp_path / "core"
    stats = _write(out, 4 * MIB, pieces, direct=False)
    _check(out, 4 * MIB, pieces)
    assert stats.direct_bytes == 0 and stats.direct_fallback == "disabled"


def test_given_one_staging_buffer_when_the_disk_lags_then_data_spills_to_the_page_cache_intact(
        tmp_path: Path) -> None:
    size = 64 * MIB
    pieces = [(off, MIB) for off in range(0, size, MIB)]
    out = tmp_path / "core"
    stats = _write(out, size, pieces, stage_count=1, stage_bytes=MIB)
    # Every piece is large and aligned: buffered bytes can only be spills.
    assert stats.buffered_bytes >= MIB and stats.buffered_writes >= 1, stats
    assert stats.direct_bytes > 0
    assert stats.direct_bytes + stats.buffered_bytes == size
    # The kernel agrees: the spilled pages sit in the page cache (direct
    # writes bypass it), before anything reads the file back.
    assert _page_cache_bytes(out) >= stats.buffered_bytes
    _check(out, size, pieces)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3 * MIB // 512)), min_size=1,
                max_size=12))
def test_given_any_layout_of_pieces_and_holes_when_written_then_the_file_is_exact(
        tmp_path: Path, layout: list[tuple[int, int]]) -> None:
    # layout: (gap in pages before the piece, piece length in 512-byte units)
    pieces, off = [], 0
    for gap_pages, units in layout:
        off += gap_pages * PAGE
        n = units * 512 - (units % 3)        # some lengths are not multiples of 512
        pieces.append((off, n))
        off += n
    size = off + PAGE
    out = tmp_path / "core"
    out.unlink(missing_ok=True)
    stats = _write(out, size, pieces, stage_count=2, stage_bytes=MIB,
                   direct_min_piece=DIRECT_ALIGN)
    _check(out, size, pieces)
    assert stats.direct_bytes + stats.buffered_bytes == sum(n for _, n in pieces)


# -- a real disk-full ---------------------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="corepeek-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


class _DenseCore:
    """Stands in for RemoteCore: only the part write_full_core uses."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read_ranges(self, ranges, views: bool = False):  # type: ignore[no-untyped-def]
        for start, length in ranges:
            for off in range(start, start + length, MIB):
                yield Piece(off, _pattern(off, min(MIB, start + length - off)))


@pytest.mark.parametrize("direct", [True, False])
def test_given_a_full_disk_when_a_core_is_written_then_enospc_reaches_the_caller(
        direct: bool) -> None:
    with _small_tmpfs("8m") as d:
        with pytest.raises(OSError) as err:
            write_full_core(_DenseCore(32 * MIB), d / "core", direct=direct)  # type: ignore[arg-type]
        assert err.value.errno == 28, err.value


def test_given_tmpfs_when_written_then_the_core_is_exact_whether_or_not_it_allows_direct_io() -> None:
    with _small_tmpfs("64m") as d:
        size = 16 * MIB
        pieces = [(0, 3000)] + [(off, MIB) for off in range(MIB, size, MIB)]
        stats = _write(d / "core", size, pieces)
        _check(d / "core", size, pieces)
        assert stats.direct_bytes + stats.buffered_bytes == sum(n for _, n in pieces)


def test_given_an_abandoned_writer_when_closed_then_threads_and_descriptors_are_released(
        tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    w = CoreFileWriter(tmp_path / "core")
    for off in range(0, 16 * MIB, MIB):
        w.write(off, _pattern(off, MIB))
    w.close()
    w.close()                                     # idempotent
    assert set(os.listdir("/proc/self/fd")) <= before | set()
    import threading
    assert not [t for t in threading.enumerate() if t.name == "core-direct-writer"]


def test_given_direct_writes_the_kernel_refuses_when_written_then_the_page_cache_takes_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With an 8-byte "alignment", the writer sends O_DIRECT writes at offsets
    # ext4 refuses (EINVAL), as some FUSE/NFS setups refuse every direct write.
    import corepeek.diskwriter as dw
    monkeypatch.setattr(dw, "DIRECT_ALIGN", 8)
    size = 8 * MIB
    pieces = [(8, MIB), (8 + MIB, MIB), (8 + 2 * MIB, 4 * MIB)]
    out = tmp_path / "core"
    stats = _write(out, size, pieces, stage_bytes=MIB, direct_min_piece=8, spill=False)
    _check(out, size, pieces)
    assert stats.direct_fallback == "direct write refused: EINVAL"
    assert stats.direct_bytes == 0 and stats.buffered_bytes == 6 * MIB


def test_given_the_descriptor_of_an_atomic_output_then_it_goes_direct_into_that_file(
        tmp_path: Path) -> None:
    from corepeek.outfile import AtomicOutput

    size = 8 * MIB
    pieces = [(off, MIB) for off in range(0, size, MIB)]
    out = tmp_path / "core"
    with AtomicOutput(out) as dest:
        stats = _write(dest.fd, size, pieces, spill=False)          # type: ignore[arg-type]
        assert not out.exists()
        dest.commit()
    _check(out, size, pieces)
    assert stats.direct_fallback == "" and stats.direct_bytes == size, stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core"]

"""The bulk transfer path: hand-encoded chunks, their client-side parsing,
packed chunks of sparse memory, vectored reads, and the sparse file writer."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corepeek.dump import write_full_core
from corepeek.remote import Piece, _chunk_pieces, parse_chunk
from corepeek.v1 import capture_pb2 as pb
from corepeek_agent.elfcore.layout import Memory
from corepeek_agent.memory import PAGE, MemoryReader, fresh_bytes
from corepeek_agent.service import _chunk_message, chunk_prefix, encode_chunk
from corepeek_agent.session import IOV_MAX, CaptureSession, Chunk, SessionOptions

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


# -- wire format ---------------------------------------------------------------------


@given(offset=U64, rid=U64, last=st.booleans(), data=st.binary(max_size=300),
       extents=st.lists(st.tuples(U64, U64), max_size=5))
def test_given_a_data_chunk_when_hand_encoded_then_protobuf_and_the_fast_parser_agree(
        offset: int, rid: int, last: bool, data: bytes, extents: list) -> None:
    raw = encode_chunk(offset, rid, last, data, extents=extents)
    c = pb.CaptureResponse.FromString(raw).chunk
    assert (c.offset, c.request_id, c.last, c.data) == (offset, rid, last, data)
    assert list(c.extents) == [v for pair in extents for v in pair]
    f = parse_chunk(raw)
    assert f is not None
    assert (f.request_id, f.offset, f.last, raw[f.data_start:f.data_end]) == (rid, offset,
                                                                             last, data)
    assert f.extents == tuple(v for pair in extents for v in pair)


@given(offset=U64, rid=U64, last=st.booleans(), hole=U64)
def test_given_a_hole_chunk_when_hand_encoded_then_protobuf_reads_it(
        offset: int, rid: int, last: bool, hole: int) -> None:
    raw = encode_chunk(offset, rid, last, None, hole)
    c = pb.CaptureResponse.FromString(raw).chunk
    assert (c.offset, c.request_id, c.last, c.data, c.hole_length) == (offset, rid, last, b"", hole)
    f = parse_chunk(raw)
    assert f is not None and (f.hole, f.data_end - f.data_start) == (hole, 0)


def test_given_a_prefix_when_data_follows_then_it_is_one_message() -> None:
    data = os.urandom(5000)
    raw = chunk_prefix(1 << 40, 3, True, len(data)) + data
    assert raw == encode_chunk(1 << 40, 3, True, data)


def test_given_protobuf_serialized_chunks_when_parsed_fast_then_fields_match() -> None:
    msg = pb.CaptureResponse(chunk=pb.CoreChunk(offset=77, data=b"abc", request_id=9,
                                                last=True, extents=[0, 1, 5, 2]))
    f = parse_chunk(msg.SerializeToString())
    assert f is not None and (f.offset, f.request_id, f.last, f.extents) == (77, 9, True,
                                                                            (0, 1, 5, 2))


def test_given_a_layout_or_unknown_fields_when_parsed_fast_then_none() -> None:
    assert parse_chunk(pb.CaptureResponse(layout=pb.CoreLayout(pid=1)).SerializeToString()) is None
    unknown = encode_chunk(1, 2, False, b"xy")
    # The same chunk plus an unknown field 15 (varint): left to protobuf.
    inner = unknown[2:] + b"\x78\x01"
    assert parse_chunk(b"\x12" + bytes([len(inner)]) + inner) is None
    assert parse_chunk(b"") is None and parse_chunk(b"\x12\x05ab") is None


def test_given_a_packed_chunk_when_split_then_extents_and_holes_come_out_in_order() -> None:
    raw = encode_chunk(1000, 4, True, b"AAABB", extents=[(2, 3), (10, 2)])
    rid, last, pieces, wire = _chunk_pieces(raw, views=False)
    assert (rid, last, wire) == (4, True, 5)
    assert pieces == [Piece(1000, None, 2), Piece(1002, b"AAA"), Piece(1005, None, 5),
                      Piece(1010, b"BB")]
    rid, last, pieces, _ = _chunk_pieces(raw, views=True)
    assert [bytes(p.data) if p.data is not None else p.hole for p in pieces] == [
        2, b"AAA", 5, b"BB"]


def test_given_a_malformed_packed_chunk_when_split_then_it_is_refused() -> None:
    from corepeek.errors import CaptureError
    with pytest.raises(CaptureError):
        _chunk_pieces(encode_chunk(0, 1, True, b"AB", extents=[(0, 5)]), views=False)
    with pytest.raises(CaptureError):
        _chunk_pieces(encode_chunk(0, 1, True, b"ABCD", extents=[(4, 2), (0, 2)]), views=False)


def test_given_chunks_when_messages_built_without_raw_then_protobuf_carries_the_same() -> None:
    framed = Chunk(0, chunk_prefix(0, 5, False, 3) + b"xyz", head=len(chunk_prefix(0, 5, False, 3)))
    assert _chunk_message(framed, 5, False, raw=True) == encode_chunk(0, 5, False, b"xyz")
    m = _chunk_message(framed, 5, False)
    assert isinstance(m, pb.CaptureResponse) and m.chunk.data == b"xyz"
    packed = Chunk(8, b"ab", extents=((1, 1), (3, 1)))
    m = _chunk_message(packed, 5, True)
    assert list(m.chunk.extents) == [1, 1, 3, 1] and packed.length == 4


# -- compressed chunks --------------------------------------------------------------------


def _compressible(n: int) -> bytes:
    return b"".join(i.to_bytes(8, "little") for i in range(n // 8))


@pytest.mark.parametrize("raw", [True, False])
def test_given_compression_when_a_chunk_is_sent_then_the_client_gets_the_same_bytes(
        raw: bool) -> None:
    from corepeek.inflate import zstd_inflater
    from corepeek_agent.compress import ChunkCompressor
    comp = ChunkCompressor()
    data = _compressible(1 << 20)
    msg = _chunk_message(Chunk(4096, data), 3, True, raw=raw, compressor=comp)
    wire_msg = msg if raw else msg.SerializeToString()
    assert len(wire_msg) < len(data) // 4
    rid, last, pieces, wire = _chunk_pieces(wire_msg, views=raw,
                                            inflate=zstd_inflater(1 << 20))
    assert (rid, last) == (3, True) and wire < len(data) // 4
    assert [(p.offset, bytes(p.data)) for p in pieces] == [(4096, data)]
    assert comp.raw_bytes == len(data) and comp.sent_bytes == wire


def test_given_a_compressed_packed_chunk_when_split_then_extents_index_the_inflated_bytes() -> None:
    from corepeek.inflate import zstd_inflater
    from corepeek_agent.compress import ChunkCompressor
    a, b = _compressible(8192), b"\x07" * 4096
    msg = _chunk_message(Chunk(0, a + b, extents=((4096, 8192), (20480, 4096))), 1, False,
                         raw=True, compressor=ChunkCompressor())
    _, _, pieces, _ = _chunk_pieces(msg, views=False, inflate=zstd_inflater(1 << 20))
    assert pieces == [Piece(0, None, 4096), Piece(4096, a), Piece(12288, None, 8192),
                      Piece(20480, b)]


def test_given_incompressible_data_when_sent_with_compression_then_it_goes_raw() -> None:
    import os
    from corepeek_agent.compress import ChunkCompressor
    data = os.urandom(1 << 20)
    comp = ChunkCompressor()
    msg = _chunk_message(Chunk(0, data), 1, True, raw=True, compressor=comp)
    f = parse_chunk(msg)
    assert f is not None and f.raw_length == 0 and msg[f.data_start:f.data_end] == data
    assert comp.sent_bytes == comp.raw_bytes == len(data)


def test_given_a_lying_compressed_chunk_when_received_then_it_is_a_protocol_error() -> None:
    import zstandard
    from corepeek.errors import CaptureError
    from corepeek.inflate import zstd_inflater
    inflate = zstd_inflater(1 << 20)
    frame = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))   # 64 MiB of zeros, ~2 KiB
    with pytest.raises(CaptureError, match="declares"):
        _chunk_pieces(encode_chunk(0, 1, True, frame, raw_length=4096), False, inflate)
    with pytest.raises(CaptureError, match="exceeds"):
        _chunk_pieces(encode_chunk(0, 1, True, bomb, raw_length=64 << 20), False, inflate)
    with pytest.raises(CaptureError, match="bad compressed|declares"):
        _chunk_pieces(encode_chunk(0, 1, True, b"not zstd at all", raw_length=10), False,
                      inflate)
    with pytest.raises(CaptureError, match="not asked for"):
        _chunk_pieces(encode_chunk(0, 1, True, frame, raw_length=1 << 20), False, None)


# -- packing sparse memory ----------------------------------------------------------------


class _FakeReader:
    """Memory = a dict of populated pages (page address -> fill byte)."""

    def __init__(self, pages: dict[int, int]) -> None:
        self.pages = pages
        self.readv_calls = 0

    def _byte(self, addr: int) -> int:
        return self.pages.get(addr // PAGE * PAGE, 0)

    def populated_runs(self, vaddr: int, length: int):  # type: ignore[no-untyped-def]
        pos, end = vaddr, vaddr + length
        while pos < end:
            pop = pos // PAGE * PAGE in self.pages
            stop = pos
            while stop < end and (stop // PAGE * PAGE in self.pages) == pop:
                stop = min(end, stop // PAGE * PAGE + PAGE)
            yield pos, stop - pos, pop
            pos = stop

    def read_bytes(self, vaddr: int, length: int, prefix: bytes = b"") -> bytes:
        out = bytearray(prefix)
        pos, end = vaddr, vaddr + length
        while pos < end:
            stop = min(end, pos // PAGE * PAGE + PAGE)
            out += bytes([self._byte(pos)]) * (stop - pos)
            pos = stop
        return bytes(out)

    def read_runs(self, runs, prefix: bytes = b"") -> bytes:  # type: ignore[no-untyped-def]
        self.readv_calls += 1
        assert len(runs) <= IOV_MAX
        return prefix + b"".join(self.read_bytes(v, n) for v, n in runs)


def _session(reader: _FakeReader, packed: bool, step: int) -> CaptureSession:
    s = CaptureSession(1, options=SessionOptions(packed=packed, chunk_size=step))
    s._reader = reader  # type: ignore[assignment]
    s._anon_private = [True]
    return s


def _rebuild(chunks: list[Chunk], base: int, length: int) -> bytes:
    img = bytearray(length)
    pos = base
    for c in chunks:
        assert c.offset == pos, "chunks must tile the piece in order"
        if c.data is not None:
            payload = c.data[c.head:]
            if c.extents:
                d = 0
                for at, n in c.extents:
                    img[c.offset - base + at:c.offset - base + at + n] = payload[d:d + n]
                    d += n
                assert d == len(payload)
            else:
                img[c.offset - base:c.offset - base + len(payload)] = payload
        pos += c.length
    assert pos == base + length
    return bytes(img)


@settings(max_examples=60, deadline=None)
@given(populated=st.sets(st.integers(min_value=0, max_value=199), max_size=120),
       packed=st.booleans(), step_pages=st.sampled_from([1, 3, 16, 64]))
def test_given_sparse_memory_when_chunked_then_the_image_is_exact(
        populated: set[int], packed: bool, step_pages: int) -> None:
    vaddr, pages = 0x7F0000000000, 200
    reader = _FakeReader({vaddr + p * PAGE: (p % 250) + 1 for p in populated})
    s = _session(reader, packed, step_pages * PAGE)
    calls: list[tuple[int, int, tuple]] = []

    def frame(off: int, n: int, ext: tuple) -> bytes:
        calls.append((off, n, ext))
        return b"H" * 7

    base = 123 * PAGE
    chunks = list(s._memory_chunks(base, Memory(vaddr, pages * PAGE, 0), frame))
    expect = b"".join(bytes([(p % 250) + 1]) * PAGE if p in populated else bytes(PAGE)
                      for p in range(pages))
    assert _rebuild(chunks, base, pages * PAGE) == expect
    data = [c for c in chunks if c.data is not None]
    assert all(c.head == 7 and len(c.data) - 7 <= step_pages * PAGE for c in data)
    assert sum(len(c.data) - 7 for c in data) == len(populated) * PAGE   # only what was touched
    assert len(calls) == len(data)
    if packed:
        # Holes ride in packed chunks: a hole chunk only comes before a run too
        # long to pack, or at the end.
        for c, nxt in zip(chunks, chunks[1:]):
            assert c.data is not None or (nxt.data is not None and not nxt.extents)


def test_given_many_lone_pages_when_packed_then_few_chunks_and_reads() -> None:
    vaddr, pages = 0x10000000, 4096
    populated = {p for p in range(0, pages, 3)}
    reader = _FakeReader({vaddr + p * PAGE: 1 for p in populated})
    s = _session(reader, True, 1024 * PAGE)
    chunks = list(s._memory_chunks(0, Memory(vaddr, pages * PAGE, 0)))
    assert len(chunks) == 2 and reader.readv_calls == 2      # 1366 pages: 1024 + 342


# -- vectored reads of this process's own memory --------------------------------------------


def _addr(buf: object) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]


def test_given_runs_of_local_memory_when_read_vectored_then_bytes_and_zeros_for_faults() -> None:
    area = mmap.mmap(-1, 8 * PAGE)
    for i in range(8):
        area[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    base = _addr(area)
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    gaddr = libc.mmap(None, PAGE, 0, 0x22, -1, 0)    # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
    assert gaddr not in (None, ctypes.c_void_p(-1).value)   # reads of it fault
    reader = MemoryReader(os.getpid())
    try:
        runs = [(base, 10), (base + 2 * PAGE, PAGE), (gaddr, 100), (base + 7 * PAGE + 5, 20)]
        got = reader.read_runs(runs, b"HDR")
        assert got == b"HDR" + b"\x01" * 10 + b"\x03" * PAGE + bytes(100) + b"\x08" * 20
        many = [(base + (i % 8) * PAGE, 3) for i in range(IOV_MAX + 5)]
        assert reader.read_runs(many) == b"".join(bytes([i % 8 + 1]) * 3
                                                  for i in range(IOV_MAX + 5))
        assert reader.read_bytes(base + PAGE - 2, 4, b"P") == b"P\x01\x01\x02\x02"
        assert reader.read_bytes(gaddr, 8) == bytes(8)
    finally:
        reader.close()
        libc.munmap(ctypes.c_void_p(gaddr), ctypes.c_size_t(PAGE))


def test_given_fresh_bytes_when_filled_then_they_are_ordinary_bytes() -> None:
    b, view = fresh_bytes(6)
    view[:] = b"abcdef"
    view.release()
    assert b == b"abcdef" and hash(b) == hash(b"abcdef")
    assert fresh_bytes(0)[0] == b""


# -- the sparse file writer ---------------------------------------------------------------


class _FakeCore:
    def __init__(self, size: int, pieces: list[Piece]) -> None:
        self.size = size
        self.pieces = pieces

    def read_ranges(self, ranges, views: bool = False):  # type: ignore[no-untyped-def]
        list(ranges)
        yield from self.pieces


@pytest.mark.parametrize("writer_thread", [True, False])
def test_given_data_and_holes_when_written_then_the_file_is_sparse_and_exact(
        tmp_path: Path, writer_thread: bool) -> None:
    size = 64 * 1024 * 1024
    pieces = [Piece(0, b"A" * 4096), Piece(4096, None, 32 * 1024 * 1024 - 4096),
              Piece(32 * 1024 * 1024, memoryview(b"B" * 8192)),
              Piece(32 * 1024 * 1024 + 8192, None, size - 32 * 1024 * 1024 - 8192)]
    seen: list[int] = []
    out = tmp_path / "core"
    assert write_full_core(_FakeCore(size, pieces), out, progress=seen.append,  # type: ignore[arg-type]
                           writer_thread=writer_thread) == size
    assert out.stat().st_size == size and sum(seen) == size
    assert out.stat().st_blocks * 512 < 1024 * 1024
    with open(out, "rb") as f:
        assert f.read(4096) == b"A" * 4096 and f.read(4096) == bytes(4096)
        f.seek(32 * 1024 * 1024)
        assert f.read(8192) == b"B" * 8192

"""A core at rest: fixed-size blocks, each an independent zstd frame (with its
content checksum), all-zero blocks left out.  The block table (file offset,
compressed length, CRC-32 of the compressed bytes) lets any offset be served
by decompressing one block; a block whose CRC or frame checksum fails raises
:class:`Corrupt`."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

BLOCK = 1 << 20
_ENTRY = struct.Struct("<QII")          # file offset, compressed length (0: zeros), crc32
ZSTD_LEVEL = 3


class Corrupt(Exception):
    """Stored bytes do not match their checksum."""


@dataclass(frozen=True)
class Written:
    core_size: int
    stored_bytes: int
    sha256: str                          # of the raw core
    table: bytes                         # packed block table


class FrameWriter:
    """Takes the core in order (data and holes) and writes the frames to ``fd``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                              write_content_size=True)
        self._buf = bytearray()
        self._table: list[bytes] = []
        self._pos = 0
        self._size = 0
        self._sha = hashlib.sha256()

    def data(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._size += len(data)
        view = memoryview(data)
        while view:
            take = BLOCK - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == BLOCK:
                self._flush()

    def zeros(self, length: int) -> None:
        while length:
            take = min(length, BLOCK - len(self._buf))
            if not self._buf and take == BLOCK:
                self._sha.update(bytes(BLOCK))
                self._size += BLOCK
                self._table.append(_ENTRY.pack(0, 0, 0))
            else:
                self.data(bytes(take))
            length -= take

    def _flush(self) -> None:
        buf, self._buf = bytes(self._buf), bytearray()
        if buf.count(0) == len(buf):
            self._table.append(_ENTRY.pack(0, 0, 0))
            return
        frame = self._zstd.compress(buf)
        _write_all(self.fd, frame)
        self._table.append(_ENTRY.pack(self._pos, len(frame), zlib.crc32(frame)))
        self._pos += len(frame)

    def finish(self) -> Written:
        if self._buf:
            self._flush()
        os.fsync(self.fd)
        return Written(self._size, self._pos, self._sha.hexdigest(), b"".join(self._table))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Serves (offset, length) of a stored core from its frames."""

    def __init__(self, fd: int, table: bytes, core_size: int) -> None:
        self.fd = fd
        self.size = core_size
        self._table = [_ENTRY.unpack_from(table, i) for i in range(0, len(table), _ENTRY.size)]
        self._zstd = zstandard.ZstdDecompressor()
        self._cached: tuple[int, bytes] | None = None

    def verify(self) -> None:
        """Check every block's CRC (reads the compressed file once); raises Corrupt."""
        for i, (off, n, crc) in enumerate(self._table):
            if n and zlib.crc32(os.pread(self.fd, n, off)) != crc:
                raise Corrupt(f"block {i} fails its checksum")

    def block(self, i: int) -> bytes | None:
        """Block ``i`` decompressed, or None for a block of zeros."""
        off, n, crc = self._table[i]
        if not n:
            return None
        if self._cached and self._cached[0] == i:
            return self._cached[1]
        frame = os.pread(self.fd, n, off)
        if len(frame) != n or zlib.crc32(frame) != crc:
            raise Corrupt(f"block {i} fails its checksum")
        try:
            raw = self._zstd.decompress(frame)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"block {i}: {exc}") from None
        self._cached = (i, raw)
        return raw

    def read(self, offset: int, length: int) -> Iterator[tuple[int, bytes | None, int]]:
        """(offset, data or None for zeros, length) pieces, at most one block each."""
        end = min(offset + length, self.size)
        while offset < end:
            i, within = divmod(offset, BLOCK)
            n = min(BLOCK - within, end - offset)
            raw = self.block(i)
            yield offset, (None if raw is None else raw[within:within + n]), n
            offset += n

"""Compression of data chunks for slow links (CaptureOptions.compression).

zstd at level 1: on process memory it gives the same ratio as level 3 and is
the fastest level (docs/performance.md).  A chunk is sent compressed only if
that saves at least an eighth of it; incompressible memory (encrypted or
already compressed data) then costs one failed attempt, not the receiver's
time as well.
"""

from __future__ import annotations

import zstandard

ZSTD_LEVEL = 1


class ChunkCompressor:
    """One per session; used from the session's RPC thread only (not thread-safe)."""

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        # Content size in every frame header: the client checks it against
        # raw_length before it allocates anything.
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.raw_bytes = 0          # data offered
        self.sent_bytes = 0         # data as sent (compressed or not)

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """The compressed frame, or None when it would not save enough."""
        n = len(data)
        out = self._zstd.compress(data)
        self.raw_bytes += n
        if len(out) > n - n // 8:
            self.sent_bytes += n
            return None
        self.sent_bytes += len(out)
        return out

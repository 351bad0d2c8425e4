"""Decompression of compressed data chunks (CaptureOptions.compression).

The agent is trusted to send core bytes, not to size our allocations: every
frame must declare, in its header, exactly the ``raw_length`` its chunk
announced, and that may not exceed the session's chunk size.  A frame that
claims more, less, or decodes to something else is a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable

import zstandard

from .errors import CaptureError

Inflate = Callable[[bytes | memoryview, int], bytes]


def zstd_inflater(max_raw: int) -> Inflate:
    """A decompressor for one capture stream (one thread)."""
    zstd = zstandard.ZstdDecompressor()

    def inflate(data: bytes | memoryview, raw_length: int) -> bytes:
        if raw_length > max_raw:
            raise CaptureError(f"protocol error: a compressed chunk of {raw_length} bytes "
                               f"exceeds the chunk size {max_raw}")
        try:
            declared = zstandard.frame_content_size(data)
            if declared != raw_length:
                raise CaptureError(f"protocol error: a compressed chunk declares {declared} "
                                   f"bytes, its message {raw_length}")
            out = zstd.decompress(data, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise CaptureError(f"protocol error: bad compressed chunk: {exc}") from None
        if len(out) != raw_length:
            raise CaptureError(f"protocol error: a compressed chunk decoded to {len(out)} "
                               f"bytes, not {raw_length}")
        return out

    return inflate

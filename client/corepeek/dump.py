"""Writing a remote core to a file: sparse where the agent sent holes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .remote import RemoteCore

Progress = Callable[[int], None]


def write_full_core(core: RemoteCore, out: Path, progress: Progress | None = None,
                    request_bytes: int = 64 * 1024 * 1024) -> int:
    """Stream the whole core into ``out``; returns the core size.

    Holes are skipped with pwrite offsets and the file is extended with
    ftruncate, so untouched memory takes no disk space.
    """
    size = core.size
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for start in range(0, size, request_bytes):
            for piece in core.read_range(start, min(request_bytes, size - start)):
                if piece.data is not None:
                    os.pwrite(fd, piece.data, piece.offset)
                if progress is not None:
                    progress(piece.length)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size

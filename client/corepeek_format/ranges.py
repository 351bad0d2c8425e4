"""Byte ranges as (start, length) pairs: the one merge both sides use."""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort and coalesce overlapping or touching ranges; drop empty ones."""
    out: list[list[int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(a, b) for a, b in out]

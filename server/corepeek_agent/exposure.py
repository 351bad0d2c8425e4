"""What a stacks-mode session may expose beyond registers: the policy's grant.

Stacks mode serves, per thread, the stack from just below its stack pointer
upward.  A rule caps those bytes (``stack_bytes``, default 1 MiB): the client
may ask for less, never more, because "the stack" of a thread is only the
mapping around its stack pointer, and a thread whose stack lives on the heap
would otherwise expose the heap above it.  The top of the main thread's stack
holds the argv and environment strings (``/proc/PID/stat`` arg_start ..
env_end): secrets live there (``AWS_SECRET_ACCESS_KEY=...``), and no unwinder
needs them, so they are served as zeros unless the rule says
``environment: true``.  Pure logic: the caller finds the addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Range = tuple[int, int]     # (file offset, length)


@dataclass(frozen=True)
class Exposure:
    """The grant of the rule that admitted a session."""

    stack_bytes: int            # stack bytes per thread the rule allows
    environment: bool           # argv/environment strings may be served

    def clamp(self, requested: int) -> int:
        """Stack bytes per thread for a client that asked ``requested`` (0: the cap)."""
        return min(requested, self.stack_bytes) if requested > 0 else self.stack_bytes


def subtract(ranges: Sequence[Range], holes: Iterable[Range]) -> list[Range]:
    """``ranges`` without the bytes of ``holes`` (both sorted or not; result sorted)."""
    cuts = sorted((o, o + n) for o, n in holes if n > 0)
    out: list[Range] = []
    for off, length in sorted(ranges):
        pos, end = off, off + length
        for lo, hi in cuts:
            if hi <= pos or lo >= end:
                continue
            if lo > pos:
                out.append((pos, lo - pos))
            pos = max(pos, hi)
        if pos < end:
            out.append((pos, end - pos))
    return out

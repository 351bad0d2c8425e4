"""Reading the snapshot: the clone's memory, and what the clone lacks.

Owns :class:`CloneReader` (``/proc/CLONE/mem``), :class:`SnapshotReader`
(routes each byte range to the clone, the running original or the bytes held
in memory) and :func:`preread`, which reads the private copies the clone
lacks from the frozen original.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .. import procfs
from ..elfcore.model import DumpedMapping
from ..errors import ProcessGone
from ..memory import MemoryReader
from .obstacles import PREREAD_BUDGET, SPECIAL_UNCOPIED, plan_preread, private_copies


@dataclass
class HeldRegion:
    """Bytes of a mapping the clone lacks, read from the frozen original.

    ``runs`` are (vaddr, data) of the populated parts; the rest reads as zeros.
    """

    start: int
    end: int
    runs: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        return sum(len(d) for _, d in self.runs)


class CloneReader(MemoryReader):
    """The clone's memory through ``/proc/CLONE/mem``, not process_vm_readv.

    process_vm_readv pins the pages it copies (FOLL_PIN), and pinning an
    anonymous page the clone still shares copy-on-write with the target makes
    the kernel unshare it first (gup_must_unshare): every page read would be
    copied in the clone, charged to the target's memory cgroup, at a third of
    the speed.  ``/proc/PID/mem`` takes plain references (FOLL_GET) and copies
    nothing.  Population (holes) still comes from the clone's pagemap.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            super().close()
            raise

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
        super().close()

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        if len(view) == 0:
            return 0
        try:
            got = os.preadv(self._mem, [view], vaddr)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM, errno.ESRCH):
                raise
            got = 0
        if got == 0:
            self._check_alive()                  # an exited clone reads as nothing
        return got

    def _check_alive(self) -> None:
        try:
            state = procfs.stat(self.tid).state
        except ProcessGone:
            state = "X"
        if state in ("Z", "X"):
            raise ProcessGone(f"the snapshot clone {self.tid} exited during the capture")


class SnapshotReader(MemoryReader):
    """Reads the snapshot: the clone, except what the clone does not have.

    ``held`` regions are served from memory (pre-read while frozen),
    ``from_original`` (start, end) ranges from the running original, the rest
    from the clone.  ``tid`` stays the original's thread, so the session's
    liveness checks still watch the target; ``clone_pid`` is the clone.
    """

    def __init__(self, clone_pid: int, original: MemoryReader,
                 held: Sequence[HeldRegion] = (),
                 from_original: Sequence[tuple[int, int]] = (),
                 clone: MemoryReader | None = None) -> None:
        # No MemoryReader.__init__: every read is routed to one of these.
        self.clone = clone if clone is not None else CloneReader(clone_pid)
        self.original = original
        self.tid = original.tid
        self.clone_pid = clone_pid
        self._pagemap, self._scan_ok = -1, False
        self._regions: list[tuple[int, int, HeldRegion | None]] = sorted(
            [(h.start, h.end, h) for h in held] + [(s, e, None) for s, e in from_original],
            key=lambda r: r[0])

    def close(self) -> None:
        self.clone.close()
        self.original.close()

    def _split(self, vaddr: int, length: int) -> Iterator[tuple[int, int, object]]:
        """(start, length, source) parts: a HeldRegion, "original", or "clone"."""
        pos, end = vaddr, vaddr + length
        for start, stop, held in self._regions:
            if stop <= pos or start >= end:
                continue
            if start > pos:
                yield pos, start - pos, "clone"
                pos = start
            part_end = min(stop, end)
            yield pos, part_end - pos, held if held is not None else "original"
            pos = part_end
        if pos < end:
            yield pos, end - pos, "clone"

    def populated_runs(self, vaddr: int, length: int) -> Iterator[tuple[int, int, bool]]:
        for start, n, source in self._split(vaddr, length):
            if source == "clone":
                yield from self.clone.populated_runs(start, n)
            elif source == "original":
                yield from self.original.populated_runs(start, n)
            else:
                assert isinstance(source, HeldRegion)
                yield from self._runs_from(start, n, iter(
                    (a, a + len(d)) for a, d in source.runs))

    def read_into(self, vaddr: int, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)
        done = 0
        for start, n, source in self._split(vaddr, len(view)):
            part = view[done:done + n]
            if source == "clone":
                got = self.clone.read_into(start, part)
            elif source == "original":
                got = self.original.read_into(start, part)
            else:
                assert isinstance(source, HeldRegion)
                part[:] = bytes(n)
                for a, data in source.runs:
                    lo, hi = max(a, start), min(a + len(data), start + n)
                    if lo < hi:
                        part[lo - start:hi - start] = data[lo - a:hi - a]
                got = n
            done += got
            if got < n:
                break
        return done


def preread(reader: MemoryReader, dumped: Sequence[DumpedMapping],
            budget: int = PREREAD_BUDGET) -> tuple[list[HeldRegion], list[int]]:
    """Read the private copies the clone lacks from the frozen original.

    Returns the held regions and the indexes (into ``dumped``) left to be read
    from the original after the thaw (over ``budget``).
    """
    idx = private_copies(dumped)
    plans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for i in idx:
        m = dumped[i].mapping
        end = m.start + dumped[i].dump_size
        if m.file_backed or m.path in SPECIAL_UNCOPIED:
            runs = [(m.start, end)]
        else:
            runs = [(s, s + n) for s, n, pop in reader.populated_runs(m.start, end - m.start)
                    if pop]
        plans.append((m.start, end, runs))
    held_idx, later_idx = plan_preread([sum(b - a for a, b in r) for _, _, r in plans], budget)
    held = []
    for j in held_idx:
        start, end, runs = plans[j]
        region = HeldRegion(start, end)
        for a, b in runs:
            data, _gaps = reader.read(a, b - a)
            region.runs.append((a, bytes(data)))
        held.append(region)
    return held, [idx[j] for j in later_idx]

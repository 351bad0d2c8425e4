"""Every read of /proc the agent makes, parsed into plain records.

Kept in one module so the rest of the agent (and its tests) never parse /proc
text themselves.  Functions raise ``ProcessGone`` when the process or thread
vanished, which callers map to NOT_FOUND or drop the thread.
"""

from __future__ import annotations

import os
import re
import stat as statmod
from collections.abc import Iterator
from dataclasses import dataclass

from .elfcore.model import Mapping
from .errors import ProcessGone

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(path) from exc
    except OSError as exc:
        if exc.errno in (3,):  # ESRCH: zombie or exiting task
            raise ProcessGone(path) from exc
        raise


@dataclass(frozen=True)
class Stat:
    """Selected fields of /proc/PID[/task/TID]/stat (see proc(5))."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    utime: int      # clock ticks
    stime: int
    cutime: int
    cstime: int
    nice: int
    num_threads: int
    start_time: int  # clock ticks after boot
    rss_pages: int
    # Where argv and the environment strings live (fields 48-51; 0 when the
    # kernel hides them): the top of the main thread's stack.
    arg_start: int = 0
    env_end: int = 0
    # Field 38: the signal the parent gets at exit (0 for a snapshot clone).
    exit_signal: int = 17


def parse_stat(text: str) -> Stat:
    """Parse a stat line; comm may contain spaces and parentheses."""
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    f = lambda n: int(rest[n - 3])  # noqa: E731
    return Stat(pid=int(text[:lpar]), comm=text[lpar + 1:rpar], state=rest[0],
                ppid=f(4), pgrp=f(5), session=f(6), flags=f(9), utime=f(14), stime=f(15),
                cutime=f(16), cstime=f(17), nice=f(19), num_threads=f(20),
                start_time=f(22), rss_pages=f(24),
                arg_start=f(48) if len(rest) > 48 else 0, env_end=f(51) if len(rest) > 48 else 0,
                exit_signal=f(38) if len(rest) > 35 else 17)


def stat(pid: int, tid: int | None = None) -> Stat:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return parse_stat(_read(path).decode(errors="replace"))


@dataclass(frozen=True)
class Usage:
    """What the trigger sampler reads of /proc/PID/stat (see :func:`usage`)."""

    comm: str
    state: str
    cpu_ticks: int      # utime + stime
    num_threads: int
    start_time: int
    rss_pages: int


def usage(pid: int) -> Usage:
    """The fields of /proc/PID/stat the trigger sampler needs, read without a
    buffered file object and parsed only as far as needed: it runs for every
    process on the host at each sampling interval (bench/bench_triggers.py)."""
    raw = _read_once(f"/proc/{pid}/stat", 1024, pid)
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    rest = raw[rpar + 2:].split(None, 22)       # rest[N - 3] is field N
    if lpar < 0 or len(rest) < 22:
        raise ProcessGone(pid)
    return Usage(comm=raw[lpar + 1:rpar].decode(errors="replace"), state=chr(rest[0][0]),
                 cpu_ticks=int(rest[11]) + int(rest[12]), num_threads=int(rest[17]),
                 start_time=int(rest[19]), rss_pages=int(rest[21]))


def _read_once(path: str, size: int, what: object) -> bytes:
    """One ``read`` of a small /proc file (no buffered file object: these run
    per process per sampling interval, and per thread in a freeze)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(what) from exc
    try:
        return os.read(fd, size)
    except ProcessLookupError as exc:
        raise ProcessGone(what) from exc
    finally:
        os.close(fd)


def thread_state(pid: int, tid: int) -> str:
    """The state letter of one thread: what a freeze reads for every thread
    just before seizing it, so it avoids ``open()`` and full parsing (half the
    cost of :func:`stat` in a 200-thread freeze)."""
    path = f"/proc/{pid}/task/{tid}/stat"
    raw = _read_once(path, 512, path)
    end = raw.rfind(b")")
    if end < 0 or end + 2 >= len(raw):
        raise ProcessGone(path)
    return chr(raw[end + 2])


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    """/proc/.../status as a dict of raw values."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out: dict[str, str] = {}
    for line in _read(path).decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def ticks_to_us(ticks: int) -> int:
    return ticks * 1_000_000 // CLK_TCK


def pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


def task_ids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(pid) from exc


def comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").decode(errors="replace").rstrip("\n")


def cmdline(pid: int) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline")
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def cmdline_bytes(pid: int, tid: int | None = None) -> bytes:
    """Raw argv; read through a live thread when the group leader is a zombie."""
    return _read(f"/proc/{pid}/cmdline" if tid is None else f"/proc/{pid}/task/{tid}/cmdline")


def exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/PID/fd)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(pid) from exc


def map_file_head(pid: int, start: int, end: int, length: int = 4096) -> bytes:
    """The first bytes of the file mapped at [start, end) (``/proc/PID/map_files``:
    the mapped inode itself, even if the path was replaced); b"" if unreadable."""
    try:
        fd = os.open(f"/proc/{pid}/map_files/{start:x}-{end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, length, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def exe_elf_class(pid: int) -> int:
    """32 or 64 from the executable's own ELF header (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            ident = f.read(5)
    except OSError:
        return 0
    if ident[:4] != b"\x7fELF":
        return 0
    return {1: 32, 2: 64}.get(ident[4], 0)


def exe_elf_ident(pid: int) -> tuple[int, int]:
    """(32 or 64, e_machine) from the executable's ELF header; (0, 0) if unreadable."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            ident = f.read(20)
    except OSError:
        return 0, 0
    if len(ident) < 20 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
        return 0, 0
    byteorder = "big" if ident[5] == 2 else "little"
    return {1: 32, 2: 64}[ident[4]], int.from_bytes(ident[18:20], byteorder)


def cgroup(pid: int) -> str:
    try:
        text = _read(f"/proc/{pid}/cgroup").decode(errors="replace")
    except (ProcessGone, PermissionError):
        return ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return text.splitlines()[0].split(":", 2)[-1] if text else ""


def auxv(pid: int, tid: int | None = None) -> bytes:
    base = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    return _read(f"{base}/auxv")


def coredump_filter(pid: int) -> int:
    return int(_read(f"/proc/{pid}/coredump_filter").decode().strip() or "33", 16)


_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def _stat_map_file(pid: int, start: int, end: int) -> tuple[int | None, int | None]:
    try:
        st = os.stat(f"/proc/{pid}/map_files/{start:x}-{end:x}")
    except OSError:
        return None, None
    return st.st_nlink, statmod.S_IMODE(st.st_mode)


def parse_smaps(text: str) -> Iterator[tuple[re.Match[str], dict[str, str]]]:
    """Yield each maps line match with its smaps fields."""
    current: re.Match[str] | None = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m and "-" in line.split(" ", 1)[0]:
            if current is not None:
                yield current, fields
            current, fields = m, {}
        elif current is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if current is not None:
        yield current, fields


def _kb(value: str | None) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def mappings(pid: int, tid: int | None = None) -> list[Mapping]:
    """Every VMA with the smaps facts the dump filter needs.

    ``tid`` names a live thread to read through, for processes whose group
    leader is a zombie (its own maps are empty).
    """
    base = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    text = _read(f"{base}/smaps").decode(errors="surrogateescape")
    out: list[Mapping] = []
    for m, fields in parse_smaps(text):
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        inode = int(m.group(6))
        path = m.group(7)
        nlink = mode = None
        if inode != 0:
            nlink, mode = _stat_map_file(pid, start, end)
        out.append(Mapping(
            start=start, end=end, perms=m.group(3), offset=int(m.group(4), 16),
            inode=inode, path=path,
            vm_flags=frozenset(fields.get("VmFlags", "").split()),
            anon_bytes=_kb(fields.get("Anonymous")) + _kb(fields.get("Swap")),
            shared_bytes=(_kb(fields.get("Shared_Clean")) + _kb(fields.get("Shared_Dirty"))
                          + _kb(fields.get("KSM"))),
            file_nlink=nlink, file_mode=mode))
    return out


def signal_masks(pid: int, tid: int) -> tuple[int, int]:
    """(pending, blocked) signal masks of one thread."""
    st = status(pid, tid)
    return int(st.get("SigPnd", "0"), 16), int(st.get("SigBlk", "0"), 16)


def tracer_pid(pid: int, tid: int | None = None) -> int:
    return int(status(pid, tid).get("TracerPid", "0"))


def foreign_tracer(pid: int) -> tuple[int, int, str] | None:
    """(tid, tracer pid, tracer comm) of the first traced thread of ``pid``, or None.

    Threads that vanish while being looked at are skipped; a tracer that
    exits meanwhile keeps its pid with an empty comm.
    """
    for tid in sorted(task_ids(pid)):
        try:
            tracer = tracer_pid(pid, tid)
        except ProcessGone:
            continue
        if tracer:
            try:
                name = comm(tracer)
            except ProcessGone:
                name = ""
            return tid, tracer, name
    return None


def uid_gid(pid: int) -> tuple[int, int]:
    st = status(pid)
    return int(st["Uid"].split()[0]), int(st["Gid"].split()[0])


# -- mapped files (mapped_files.py) ------------------------------------------------

def map_devices(pid: int, tid: int | None = None) -> dict[int, int]:
    """VMA start -> st_dev of its file, from the maps line's major:minor."""
    base = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    out: dict[int, int] = {}
    for line in _read(f"{base}/maps").decode(errors="surrogateescape").splitlines():
        m = _MAPS_LINE.match(line)
        if m and m.group(6) != "0":
            major, _, minor = m.group(5).partition(":")
            out[int(m.group(1), 16)] = os.makedev(int(major, 16), int(minor, 16))
    return out


def open_mapped_file(pid: int, start: int, end: int, dev: int, ino: int,
                     path: str) -> int | None:
    """A read-only fd on the regular file with inode (dev, ino) that ``pid``
    maps at [start, end), or None.

    Through /proc/PID/map_files (the inode actually mapped, even deleted or in
    another mount namespace; needs CAP_CHECKPOINT_RESTORE), else through
    /proc/PID/root/PATH.  Either is stat'ed before it is opened (so no device
    or FIFO is ever opened) and fstat'ed after, and must be that inode.
    """
    for name in (f"/proc/{pid}/map_files/{start:x}-{end:x}", f"/proc/{pid}/root{path}"):
        try:
            st = os.stat(name)
            if not statmod.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
                continue
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            continue
        st = os.fstat(fd)
        if statmod.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
            return fd
        os.close(fd)
    return None


def map_file_identity(pid: int, start: int, end: int) -> tuple[int, int, int, int] | None:
    """(st_dev, st_ino, st_mode, st_size) of the file mapped at [start, end), or None."""
    try:
        st = os.stat(f"/proc/{pid}/map_files/{start:x}-{end:x}")
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mode, st.st_size


# -- host memory (snapshot mode's memory rule, snapshot/memrule.py) -------------------

def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (the fields given in kB)."""
    out: dict[str, int] = {}
    for line in _read("/proc/meminfo").decode().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def overcommit_memory() -> int:
    """vm.overcommit_memory: 0 heuristic, 1 always, 2 strict (CommitLimit)."""
    return int(_read("/proc/sys/vm/overcommit_memory").decode().strip() or 0)


_CG_V1 = "/sys/fs/cgroup/memory"
_CG_V2 = "/sys/fs/cgroup"


def _cg_value(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text in ("max", "") else int(text)


def memory_cgroup_headroom(pid: int) -> tuple[int, str] | None:
    """(bytes the memory cgroups of ``pid`` may still charge, the tightest
    cgroup's path), over it and every ancestor with a limit; None if unlimited.

    cgroup v2 (``memory.max - memory.current``) or v1 (``memory.limit_in_bytes
    - memory.usage_in_bytes``), whichever holds the process.
    """
    try:
        lines = _read(f"/proc/{pid}/cgroup").decode(errors="replace").splitlines()
    except ProcessGone:
        return None
    v1 = next((ln.split(":", 2)[2] for ln in lines
               if "memory" in ln.split(":", 2)[1].split(",")), None)
    if v1 is not None:
        root, limit_f, usage_f, rel = _CG_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", v1
    else:
        rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
        if rel is None:
            return None
        root, limit_f, usage_f = _CG_V2, "memory.max", "memory.current"
    best: tuple[int, str] | None = None
    parts = [p for p in rel.split("/") if p]
    for depth in range(len(parts), -1, -1):
        path = os.path.join(root, *parts[:depth])
        limit, usage = _cg_value(f"{path}/{limit_f}"), _cg_value(f"{path}/{usage_f}")
        if limit is None or usage is None or limit >= 1 << 62:
            continue
        room = max(0, limit - usage)
        if best is None or room < best[0]:
            best = (room, path)
    return best

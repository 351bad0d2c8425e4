"""Partial captures of real programs: notes only, and notes + stacks.

GIVEN real targets (the `threads` program with threads parked in nanosleep,
a pipe read, a condition variable and one spinning; `bigmem` with 1 GiB
touched and 200 idle threads) WHEN a partial core is pulled through a real
agent THEN gdb, eu-stack and pyelftools read it, a stacks-only core unwinds
exactly like the full core of the same freeze, the bytes on the wire are the
bytes needed, a partial session is refused everything else, and the target
runs on untraced and undisturbed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from elftools.elf.elffile import ELFFile

from corepeek.dump import write_full_core
from corepeek.errors import CaptureError
from corepeek.notes_summary import render_text, summarize
from corepeek.partial import local_stacks_plan, write_partial_core
from corepeek.remote import open_capture
from corepeek_format import regions
from harness.checks import assert_thawed_and_undisturbed
from harness.kernel_core import xsave_size
from harness.targets import Target, TargetError
from harness.tools import GDB_BASE, TOOL_ENV, eu_stack, gdb_backtraces, gdb_backtraces_text

MIB = 1 << 20
NOTE_HEADER = 20                  # namesz, descsz, type + "CORE"/"LINUX" padded to 8
PROCESS_NOTES_MAX = 64 * 1024     # PRPSINFO, SIGINFO, AUXV, NT_FILE, XSAVE layout (2 KB measured)
PARKED = {"cp_sleeper_nanosleep", "cp_reader_pipe", "cp_waiter_condvar", "cp_spinner",
          "cp_heartbeat", "cp_signals", "main"}


def gdb(core: Path, exe: Path, *commands: str) -> str:
    args = [a for c in commands for a in ("-ex", c)]
    res = subprocess.run([*GDB_BASE, *args, str(exe), str(core)], capture_output=True,
                         text=True, timeout=120, env=TOOL_ENV, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def loads(core: Path) -> list[tuple[int, int, int]]:
    with open(core, "rb") as f:
        return [(s["p_vaddr"], s["p_memsz"], s["p_filesz"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_LOAD"]


def functions(bts: dict[int, list[str]]) -> set[str]:
    return {fn for frames in bts.values() for fn in frames}


def thread_notes_size() -> int:
    """What the kernel writes per x86_64 thread on this CPU: NT_PRSTATUS (336),
    NT_PRFPREG (512) and NT_X86_XSTATE (the XSAVE size from CPUID leaf 0xD:
    11008 bytes with AMX, 832 with AVX only), each with its note header."""
    return 3 * NOTE_HEADER + 336 + 512 + xsave_size()


def notes_core_bounds(threads: int, segments: int) -> tuple[int, int]:
    """(least, most) bytes of a notes-only core: the thread notes the kernel would
    write, and on top the ELF and program headers, the process notes, and 1 KiB a
    thread of slack (an NT_X86_SHSTK or IOPERM note where active)."""
    least = threads * thread_notes_size()
    headers = 64 + 56 * (segments + 1)
    return least, headers + PROCESS_NOTES_MAX + threads * (thread_notes_size() + 1024)


@pytest.fixture
def threads_target(build: Callable[..., Path], require_root: None) -> Iterator[Target]:
    with Target(build("threads")) as t:
        yield t


@pytest.fixture(scope="module")
def bigmem_target(build: Callable[..., Path], require_root: None) -> Iterator[Target]:
    """1 GiB touched, 200 idle threads: shared by the tests that only freeze it briefly."""
    with Target(build("bigmem"), ["-m", "1024", "-t", "200"], ready_timeout=60) as t:
        yield t


# -- notes only --------------------------------------------------------------------------


def test_notes_core_of_a_1gib_target_is_small_and_lists_every_thread(
        agent, build, bigmem_target: Target, tmp_path: Path) -> None:
    t = bigmem_target
    exe = build("bigmem")
    out = tmp_path / "notes.core"
    tids = set(t.tids())
    assert len(tids) >= 203

    with open_capture(agent.address, t.pid, mode="notes") as core:
        result = write_partial_core(core, out)
        lay = core.layout
        stats = core.stats

    assert_thawed_and_undisturbed(t)
    assert lay.total_size > 1024 * MIB                      # the full core would be > 1 GiB
    # The size of what the kernel writes for 203 threads on this CPU, not of the memory.
    least, most = notes_core_bounds(len(tids), len(lay.segments))
    assert least <= lay.notes.length and stats.data_bytes <= most, (least, stats.data_bytes, most)
    assert out.stat().st_size <= most
    assert result.mode == "notes" and result.memory_bytes == 0 and result.fetched == ()
    assert stats.data_bytes == lay.headers.length + lay.notes.length
    # every mapping is there, none carries bytes
    assert [(v, m) for v, m, _ in loads(out)] == [(s.vaddr, s.mem_size) for s in lay.segments]
    assert all(f == 0 for _, _, f in loads(out))
    # gdb: every thread, with its registers, and the mappings with their files
    text = gdb(out, exe, "info threads", "thread apply all info registers rip rsp",
               "info proc mappings", "info target")
    listed = {int(m) for m in re.findall(r"^\*?\s+\d+\s+LWP (\d+)", text, re.M)}
    assert listed == tids
    rips = {int(tid): int(rip, 16) for tid, rip in re.findall(
        r"^Thread \d+ \(LWP (\d+)\).*?\nrip\s+(0x[0-9a-f]+)", text, re.M | re.S)}
    assert rips == {th.tid: th.pc for th in lay.threads}
    assert str(exe) in text and "libc.so.6" in text
    addr = int(t.ready["addr"])                                # the 1 GiB mapping, no bytes
    assert f"{addr:#018x} - {addr + 1024 * MIB:#018x} is load" in text
    assert (addr, 1024 * MIB, 0) in loads(out)


def test_notes_summary_reads_threads_signals_and_mappings_from_the_notes(
        agent, threads_target: Target) -> None:
    t = threads_target
    with open_capture(agent.address, t.pid, mode="notes") as core:
        summary = summarize(core)
        lay = core.layout
        fetched = core.stats.data_bytes
    assert_thawed_and_undisturbed(t)

    json.dumps(summary)                                        # JSON-serialisable
    assert fetched == lay.headers.length + lay.notes.length
    assert {th["tid"]: th["pc"] for th in summary["threads"]} == {
        th.tid: f"{th.pc:#x}" for th in lay.threads}
    by_tid = {th["tid"]: th for th in summary["threads"]}
    assert by_tid[int(t.ready["tid_sleeper"])]["comm"] == "cp_sleeper"
    assert by_tid[t.pid]["state"] == "S"
    assert "SIGUSR1" in by_tid[t.pid]["blocked"]               # cp_common blocks it everywhere
    assert summary["signal"] is None                           # a live capture
    assert summary["process"]["pid"] == t.pid
    names = {m["name"] for m in summary["mappings"]}
    assert str(t.exe) in names and "[stack]" in names and "[heap]" in names
    assert any(m["stack"] for m in summary["mappings"])
    assert summary["auxv"]["AT_PAGESZ"] == "0x1000"
    text = render_text(summary)
    assert str(t.pid) in text and str(t.exe) in text and "cp_spinner" in text


def test_a_notes_session_is_refused_memory(agent, threads_target: Target) -> None:
    t = threads_target
    with open_capture(agent.address, t.pid, mode="notes") as core:
        lay = core.layout
        heap = next(s for s in lay.segments if s.name == "[heap]")
        assert [(r.offset, r.length) for r in lay.readable] == [
            (0, lay.notes.offset + lay.notes.length)]
        with pytest.raises(CaptureError) as local:            # refused without a round trip
            core.file.seek(heap.file_offset)
            core.file.read(16)
        assert local.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(CaptureError) as remote:           # and by the agent
            core.read_bytes(heap.file_offset, 16)
        assert remote.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert_thawed_and_undisturbed(t)


def test_a_notes_session_thaws_the_target_before_the_client_reads(agent, build,
                                                                   require_root) -> None:
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid, mode="notes", snapshot=True) as core:
            # the stream is still open, the client has read nothing yet: the
            # target already runs untraced, and nothing was cloned for it
            assert_thawed_and_undisturbed(t)
            assert not core.layout.snapshot and "not needed" in core.layout.snapshot_status
            notes = core.read_bytes(core.layout.notes.offset, core.layout.notes.length)
            assert len(notes) == core.layout.notes.length
            assert all(th.frozen for th in core.layout.threads)
        assert_thawed_and_undisturbed(t)


# -- stacks ---------------------------------------------------------------------------------


def test_stacks_core_unwinds_exactly_like_the_full_core_of_the_same_freeze(
        agent, build, threads_target: Target, tmp_path: Path) -> None:
    t = threads_target
    exe = build("threads")
    full, stacks = tmp_path / "full.core", tmp_path / "stacks.core"

    with open_capture(agent.address, t.pid, mode="full") as core:
        write_full_core(core, full)
        full_bytes = core.stats.data_bytes
        result = write_partial_core(core, stacks, mode="stacks")
        lay = core.layout
    assert_thawed_and_undisturbed(t)

    full_bt, stacks_bt = gdb_backtraces_text(full, exe), gdb_backtraces_text(stacks, exe)
    assert stacks_bt == full_bt                                 # frames, args, thread names
    bts = gdb_backtraces(stacks, exe)
    assert set(bts) == set(t.tids())
    assert PARKED <= functions(bts)
    assert "[Thread debugging using libthread_db enabled]" in stacks_bt
    assert eu_stack(stacks, exe) == eu_stack(full, exe)
    # the bytes pulled for the stacks core are a small part of the full core's
    # (this target is small; the 1 GiB one below shows the real ratio)
    assert result.data_bytes < full_bytes, (result.data_bytes, full_bytes)
    assert result.memory_bytes * 100 < lay.total_size
    assert {v for v, _, _ in loads(stacks)} >= {s.vaddr for s in lay.segments}


def test_a_stacks_session_reads_what_it_needs_and_nothing_else(
        agent, build, threads_target: Target, tmp_path: Path) -> None:
    t = threads_target
    exe = build("threads")
    out = tmp_path / "stacks.core"

    with open_capture(agent.address, t.pid, mode="stacks") as core:
        lay = core.layout
        readable = [(r.offset, r.length) for r in lay.readable]
        result = write_partial_core(core, out)
        # every readable byte was pulled once, and nothing else
        assert core.stats.data_bytes + core.stats.hole_bytes == regions.total(readable)
        assert core.stats.fetched == readable
        # the client's own plan through this session equals the agent's, except
        # the argv/environment strings the agent leaves out (served as zeros)
        mine = local_stacks_plan(core)
        header_and_notes = [(0, lay.notes.offset + lay.notes.length)]
        stat = Path(f"/proc/{t.pid}/stat").read_text().rpartition(")")[2].split()
        arg_start, env_end = int(stat[45]), int(stat[48])
        env = regions.vaddr_range_to_file(list(lay.segments), arg_start, env_end - arg_start)
        assert lay.environment_hidden and env
        assert regions.merge(header_and_notes + mine) == regions.merge(readable + env)
        assert not any(regions.contains(readable, o, 1) for o, _ in env)
        # anything else is refused, also a read that runs past a readable range
        heap = next(s for s in lay.segments if s.name == "[heap]")
        off, n = readable[-1]
        for offset, length in [(heap.file_offset, 64), (off + n - 8, 16)]:
            with pytest.raises(CaptureError) as denied:
                core.read_bytes(offset, length)
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert_thawed_and_undisturbed(t)

    assert result.mode == "stacks"
    assert set(result.fetched) <= set(regions.merge(readable))
    bts = gdb_backtraces(out, exe)
    assert set(bts) == set(t.tids())
    assert PARKED <= functions(bts)
    assert all("??" not in frames for frames in bts.values()), bts
    for name, key in [("cp_sleeper_nanosleep", "tid_sleeper"), ("cp_reader_pipe", "tid_reader"),
                      ("cp_waiter_condvar", "tid_waiter"), ("cp_spinner", "tid_spinner")]:
        assert name in bts[int(t.ready[key])]


def test_stacks_of_a_1gib_target_with_200_threads_are_a_tiny_transfer(
        agent, build, bigmem_target: Target, tmp_path: Path) -> None:
    t = bigmem_target
    out = tmp_path / "stacks.core"
    with open_capture(agent.address, t.pid, mode="stacks") as core:
        result = write_partial_core(core, out)
        sent = core.stats.data_bytes
        total = core.layout.total_size
        lay = core.layout
    assert_thawed_and_undisturbed(t)

    assert total > 1024 * MIB
    # headers and notes as in a notes core, then 203 stacks of a few KiB and the
    # linker's data (1.7 MB measured with AMX)
    _, notes_most = notes_core_bounds(len(t.tids()), len(lay.segments))
    assert sent < notes_most + 4 * MIB, (sent, notes_most)
    bts = gdb_backtraces(out, build("bigmem"))
    assert set(bts) == set(t.tids())
    idle = [tid for tid, frames in bts.items() if "cp_idle" in frames]
    assert len(idle) == 200
    assert result.loads_with_data >= 203


def test_a_32_bit_stacks_core_unwinds_like_its_full_core(agent, build, require_root,
                                                         tmp_path: Path) -> None:
    try:
        exe = build("threads", m32=True)
    except TargetError as exc:
        pytest.skip(f"no 32-bit toolchain: {exc}")
    full, stacks = tmp_path / "full32.core", tmp_path / "stacks32.core"
    with Target(exe) as t:
        with open_capture(agent.address, t.pid, mode="full") as core:
            assert core.layout.elf_class == 32
            write_full_core(core, full)
            write_partial_core(core, stacks, mode="stacks")
        assert_thawed_and_undisturbed(t)
        with open(stacks, "rb") as f:
            assert ELFFile(f).elfclass == 32
        assert gdb_backtraces_text(stacks, exe) == gdb_backtraces_text(full, exe)
        assert set(gdb_backtraces(stacks, exe)) == set(t.tids())


# -- the command line -----------------------------------------------------------------------


def test_cli_dumps_partial_cores_and_prints_notes(agent, build, threads_target: Target,
                                                  tmp_path: Path) -> None:
    t = threads_target
    exe = build("threads")

    def corepeek(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res

    for only in ("notes", "stacks"):
        out = tmp_path / f"{only}.core"
        res = corepeek("dump", "--agent", agent.address, str(t.pid), "--only", only,
                       "-o", str(out))
        assert f"wrote {out}" in res.stderr
        assert_thawed_and_undisturbed(t)
        text = gdb(out, exe, "info threads")
        assert {int(m) for m in re.findall(r"LWP (\d+)", text)} == set(t.tids())
    assert PARKED <= functions(gdb_backtraces(tmp_path / "stacks.core", exe))

    summary = json.loads(corepeek("notes", "--json", "--agent", agent.address,
                                  str(t.pid)).stdout)
    assert {th["tid"] for th in summary["threads"]} == set(t.tids())
    text = corepeek("notes", "--agent", agent.address, str(t.pid)).stdout
    assert "threads:" in text and "mappings:" in text
    assert_thawed_and_undisturbed(t)

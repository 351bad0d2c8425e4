"""32-bit (i386 compat) targets on an x86_64 host: corepeek writes the ELF32
core the kernel's compat writer (fs/compat_binfmt_elf.c) writes.

Real processes, a real agent on a Unix socket, real referees: readelf,
pyelftools, eu-readelf, gdb, and the kernel's own core of the same process.
Every test that freezes a process proves afterwards that it was thawed and
undisturbed, and kills and reaps it in ``finally``.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from corepeek.dump import write_full_core
from corepeek.remote import open_capture
from harness import checks, tools
from harness.kernel_compare import assert_same_as_kernel
from harness.kernel_core import allow_core_dump, cannot_check, kernel_cores
from harness.targets import Target, TargetError, build_target, proc_status_field, threads_pattern

TARGETS32 = Path(__file__).resolve().parent.parent / "targets32"
NT_386_TLS, NT_X86_XSAVE_LAYOUT = 0x200, 0x205
ROLE_FUNCS = {"tid_main": "cp_control_loop", "tid_heartbeat": "cp_heartbeat",
              "tid_signals": "cp_signals", "tid_sleeper": "cp_sleeper_nanosleep",
              "tid_reader": "cp_reader_pipe", "tid_waiter": "cp_waiter_condvar",
              "tid_spinner": "cp_spinner"}
# Threads parked in a system call both when we capture and when the kernel dumps
# (the heartbeat and the spinner run user code now and then).
PARKED_ROLES = ("tid_main", "tid_signals", "tid_sleeper", "tid_reader", "tid_waiter")
AT_PAGESZ, AT_SYSINFO_EHDR = 6, 33
EIP, ESP = 12, 15                      # word indexes in the i386 user_regs_struct


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("targets32")


@pytest.fixture(scope="module")
def threads32(bindir: Path) -> Path:
    try:
        return build_target("threads", bindir, m32=True)
    except TargetError as exc:
        cannot_check(f"cannot build a 32-bit target: {exc}")


@pytest.fixture(scope="module")
def tls_desc(bindir: Path) -> Path:
    out = bindir / "tls_desc"
    res = subprocess.run(["gcc", "-m32", "-static", "-nostdlib", "-fno-pic",
                          "-fno-stack-protector", "-O1", "-Wall", "-Wextra", "-o", str(out),
                          str(TARGETS32 / "tls_desc.c")], capture_output=True, text=True)
    if res.returncode != 0:
        cannot_check(f"cannot build tls_desc with gcc -m32: {res.stderr.strip()[:300]}")
    return out


@pytest.fixture(autouse=True)
def no_leftovers(require_root: None) -> Iterator[None]:
    before = checks.descendants()        # the session agent and its helpers
    yield
    checks.assert_no_leftover_processes(ignore=before)


# -- helpers -------------------------------------------------------------------------------


def _assert_tasks_thawed(pid: int) -> None:
    """No task of pid in t/T, none traced."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        state = proc_status_field(task / "status", "State") or ""
        tracer = proc_status_field(task / "status", "TracerPid")
        assert state[:1] not in ("t", "T"), f"task {task.name} left in state {state}"
        assert tracer in ("0", None), f"task {task.name} still traced by {tracer}"


def _capture(address: str, pid: int, out: Path, **options: object):  # type: ignore[no-untyped-def]
    with open_capture(address, pid, **options) as core:
        assert core.layout.elf_class == 32 and core.layout.arch == "i386"
        write_full_core(core, out)
        return core.layout


class Core:
    """A core file read with pyelftools: header, notes (raw and parsed) and PT_LOADs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            elf = ELFFile(f)
            self.elfclass = elf.elfclass
            self.header = {k: v for k, v in elf.header.items() if k != "e_ident"}
            self.ident = dict(elf.header["e_ident"])
            self.notes: list[tuple[str, int, bytes]] = []
            self.parsed: list = []  # type: ignore[type-arg]
            self.loads: list[tuple[int, int, int, int, int, int]] = []
            self._data: list[tuple[int, bytes]] = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_NOTE":
                    raw = seg.data()
                    self.parsed = list(seg.iter_notes())
                    off = 0
                    while off < len(raw):
                        namesz, descsz, ntype = struct.unpack_from("<III", raw, off)
                        name = raw[off + 12:off + 11 + namesz].decode()
                        doff = off + 12 + (namesz + 3) // 4 * 4
                        self.notes.append((name, ntype, raw[doff:doff + descsz]))
                        off = doff + (descsz + 3) // 4 * 4
                elif seg["p_type"] == "PT_LOAD":
                    self.loads.append((seg["p_offset"], seg["p_vaddr"], seg["p_filesz"],
                                       seg["p_memsz"], seg["p_flags"], seg["p_align"]))
                    if seg["p_filesz"]:
                        self._data.append((seg["p_vaddr"], seg.data()))

    def shape(self) -> list[tuple[str, int, int]]:
        return [(name, t, len(d)) for name, t, d in self.notes]

    def note(self, ntype: int) -> bytes:
        return next(d for _, t, d in self.notes if t == ntype)

    def threads(self) -> dict[int, dict[int, bytes]]:
        """{pid: {note type: desc}} for NT_PRSTATUS and the thread notes after it."""
        out: dict[int, dict[int, bytes]] = {}
        current: dict[int, bytes] = {}
        for _, t, d in self.notes:
            if t == 1:
                current = out.setdefault(struct.unpack_from("<i", d, 24)[0], {})
            if t not in (3, 6, 0x46494C45, 0x53494749, NT_X86_XSAVE_LAYOUT):
                current[t] = d
        return out

    def memory(self, vaddr: int, length: int) -> bytes:
        """Bytes at vaddr from the dumped segments (a range may span adjacent ones)."""
        out = b""
        while len(out) < length:
            v = vaddr + len(out)
            seg = next(((s, d) for s, d in self._data if s <= v < s + len(d)), None)
            if seg is None:
                raise AssertionError(f"{self.path} holds no data at {v:#x}")
            start, data = seg
            out += data[v - start:v - start + length - len(out)]
        return out


def _regs(prstatus: bytes) -> tuple[int, ...]:
    return struct.unpack_from("<17I", prstatus, 72)


# -- full capture: ELF32, tools, memory, partial cores --------------------------------------


def test_given_i386_threads_when_captured_then_tools_read_an_elf32_core(
        agent, threads32: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ours = tmp_path / "ours.core"
    with Target(threads32) as target:              # __exit__ kills and reaps it
        layout = _capture(agent.address, target.pid, ours)
        checks.assert_thawed_and_undisturbed(target)
    ready = target.ready
    roles = {ready[r]: f for r, f in ROLE_FUNCS.items()}

    # readelf and pyelftools: ELF32, EM_386, ET_CORE.
    text = subprocess.run(["readelf", "-h", str(ours)], capture_output=True, text=True,
                          check=True).stdout
    assert "ELF32" in text and "Intel 80386" in text and "CORE (Core file)" in text
    core = Core(ours)
    assert core.elfclass == 32 and core.header["e_machine"] == "EM_386"
    assert (core.header["e_ehsize"], core.header["e_phentsize"]) == (52, 32)
    assert len(core.loads) == len(layout.segments)

    # Notes: every one parses; compat sizes; per-thread order GENERAL FP XFP XSTATE TLS.
    assert len(core.parsed) == len(core.notes) and all("n_desc" in n for n in core.parsed)
    shape = core.shape()
    assert shape[:5] == [("CORE", 1, 144), ("CORE", 3, 124), ("CORE", 0x53494749, 128),
                         ("CORE", 6, len(core.note(6))), ("CORE", 0x46494C45,
                                                          len(core.note(0x46494C45)))]
    assert set(core.threads()) == set(roles)
    assert all(list(notes) == [1, 2, 0x46E62B7F, 0x202, NT_386_TLS]
               for notes in core.threads().values())
    psinfo = next(n for n in core.parsed if n["n_type"] == "NT_PRPSINFO")["n_desc"]
    assert (psinfo.pr_pid, psinfo.pr_fname.rstrip(b"\0")) == (target.pid,
                                                               threads32.name[:15].encode())
    files = next(n for n in core.parsed if n["n_type"] == "NT_FILE")["n_desc"]
    assert files.page_size == 4096 and str(threads32).encode() in files.filename
    auxv = dict(struct.iter_unpack("<II", core.note(6)))
    assert auxv[AT_PAGESZ] == 4096 and auxv[0] == 0 and core.note(6)[-8:] == bytes(8)
    assert any(vaddr == auxv[AT_SYSINFO_EHDR] for _, vaddr, *_ in core.loads)

    # eu-readelf names and decodes every note (the XSAVE layout note is CPU/elfutils dependent).
    eu = tools.eu_readelf_notes(ours)
    assert len(eu) == len(core.notes)
    assert [t for _, t in eu].count("PRSTATUS") == len(roles)
    assert [t for _, t in eu].count("386_TLS") == len(roles)
    eu_text = subprocess.run(["eu-readelf", "-n", str(ours)], capture_output=True, text=True,
                             check=True).stdout
    assert eu_text.count("eip:") == len(roles)

    # gdb unwinds every thread to its function.
    bts = tools.gdb_backtraces(ours, threads32)
    assert set(bts) == set(roles), tools.gdb_backtraces_text(ours, threads32)
    for tid, func in roles.items():
        assert func in bts[tid], f"thread {tid}: expected {func} in {bts[tid]}"
    assert "main" in bts[ready["tid_main"]]

    # Memory at known addresses is exact, in the file and as gdb reads it.
    pattern, heap = int(ready["pattern_addr"]), int(ready["heap_addr"])
    assert core.memory(pattern, 4096) == threads_pattern(1, 4096)
    assert core.memory(heap, 65536) == threads_pattern(2, 65536)
    assert tools.gdb_read_memory(ours, threads32, pattern, 4096) == threads_pattern(1, 4096)
    assert tools.gdb_read_memory(ours, threads32, heap + 1000, 512) == threads_pattern(2, 512, 1000)

    # The agent's per-thread pc/sp (i386 eip/esp) match the registers in the notes.
    regs = {pid: _regs(n[1]) for pid, n in core.threads().items()}
    for t in layout.threads:
        assert (t.pc, t.sp) == (regs[t.tid][EIP], regs[t.tid][ESP])


def test_given_i386_target_then_the_kernel_compat_core_has_the_same_shape(
        agent, threads32: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Header, note list and PT_LOADs equal; AUXV, NT_FILE, the XSAVE layout, the stable
    PRPSINFO and PRSTATUS fields byte for byte (see harness.kernel_compare for what
    differs by design and why); NT_386_TLS per thread and parked threads' eip/esp too."""
    ours = tmp_path / "ours.corepeek"
    with Target(threads32) as target:              # __exit__ kills and reaps it
        allow_core_dump(target.pid)
        _capture(agent.address, target.pid, ours)
        checks.assert_thawed_and_undisturbed(target)
        # The undisturbed check talks to the target: wait until every parked thread
        # is back in the system call it was captured in (same esp) before the crash.
        parked = {int(target.ready[r]): _regs(Core(ours).threads()[int(target.ready[r])][1])[ESP]
                  for r in PARKED_ROLES}
        checks.wait_parked_at(target.pid, parked)
        with kernel_cores(tmp_path) as cores:
            target.send_signal(signal.SIGSEGV)
            target.wait_exit(timeout=30)
            kernel_path = cores.core_of(target.pid)
    assert target.exit_code == -signal.SIGSEGV

    assert_same_as_kernel(ours, kernel_path)
    kernel, mine = Core(kernel_path), Core(ours)
    assert mine.ident == kernel.ident
    assert [t for _, t, _ in kernel.notes].count(NT_X86_XSAVE_LAYOUT) == 1   # compared above
    threads_a, threads_b = mine.threads(), kernel.threads()
    for pid, notes in threads_a.items():
        assert notes[NT_386_TLS] == threads_b[pid][NT_386_TLS], f"thread {pid}: NT_386_TLS"
    for role in PARKED_ROLES:
        tid = int(target.ready[role])
        ra, rb = _regs(threads_a[tid][1]), _regs(threads_b[tid][1])
        assert (ra[EIP], ra[ESP]) == (rb[EIP], rb[ESP]), f"{role} {tid}"


# -- TLS: the note exists exactly when a descriptor is in use ------------------------------


@pytest.mark.parametrize("mode,has_tls", [("none", False), ("zero-base", True)])
def test_given_tls_descriptors_then_nt_386_tls_follows_regset_tls_active(
        agent, tls_desc: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
        mode: str, has_tls: bool) -> None:
    ours = tmp_path / "ours.corepeek"
    proc = subprocess.Popen([str(tls_desc), mode], cwd=tmp_path, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith(b"ready entry="), ready
        allow_core_dump(proc.pid)
        _capture(agent.address, proc.pid, ours)
        _assert_tasks_thawed(proc.pid)
        # It keeps running: its 20 ms heartbeat dots keep coming.
        fd, got, deadline = proc.stdout.fileno(), b"", time.monotonic() + 5
        while got.count(b".") < 3 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                got += os.read(fd, 4096)
        assert got.count(b".") >= 3, "the target stopped running after the capture"
        mine = Core(ours)
        assert any(t == NT_386_TLS for _, t, _ in mine.notes) is has_tls
        with kernel_cores(tmp_path) as cores:          # the kernel agrees, whatever the host
            proc.send_signal(signal.SIGSEGV)
            assert proc.wait(timeout=30) == -signal.SIGSEGV
            kernel = cores.core_of(proc.pid)
        assert_same_as_kernel(ours, kernel)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- partial cores of a 32-bit target ------------------------------------------------------


@pytest.mark.parametrize("mode", ["notes", "stacks"])
def test_given_i386_target_then_partial_cores_are_elf32_and_gdb_reads_them(
        agent, threads32: Path, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    partial = pytest.importorskip("corepeek.partial")
    out = tmp_path / f"{mode}.core"
    with Target(threads32) as target:              # __exit__ kills and reaps it
        with open_capture(agent.address, target.pid, mode=mode) as core:
            assert core.layout.elf_class == 32 and core.layout.arch == "i386"
            partial.write_partial_core(core, out)
        checks.assert_thawed_and_undisturbed(target)
    roles = {target.ready[r]: f for r, f in ROLE_FUNCS.items()}
    c = Core(out)
    assert c.elfclass == 32 and c.header["e_machine"] == "EM_386"
    assert len(c.parsed) == len(c.notes) and set(c.threads()) == set(roles)
    regs = tools.gdb_registers(out, threads32)
    for tid, notes in c.threads().items():
        assert regs[tid]["eip"] == _regs(notes[1])[EIP]
        assert regs[tid]["esp"] == _regs(notes[1])[ESP]
    if mode == "stacks":
        bts = tools.gdb_backtraces(out, threads32)
        for tid, func in roles.items():
            assert func in bts[tid], f"thread {tid}: expected {func} in {bts[tid]}"

"""Independent tools (gdb, eu-stack, eu-readelf) that judge a core file.

They are the referees of the integration tests: a core is good if tools that
know nothing of corepeek read threads, registers, stacks and memory from it.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

GDB_BASE = ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled off",
            "-ex", "set pagination off", "-ex", "set width 0"]
TOOL_ENV = {**os.environ, "LC_ALL": "C", "DEBUGINFOD_URLS": ""}

_THREAD_HDR = re.compile(r"^Thread \d+ \(.*?LWP (\d+)\)")
_FRAME = re.compile(r"^#(\d+)\s+(?:0x[0-9a-fA-F]+ in )?(\S+) \(")
_REG = re.compile(r"^(\w+)\s+(0x[0-9a-fA-F]+|-?\d+)\b")
_EU_TID = re.compile(r"^TID (\d+):")
_EU_FRAME = re.compile(r"^#(\d+)\s+0x[0-9a-fA-F]+\s*(\S*)")
_NOTE = re.compile(r"^  (\S+)\s+(\d+)\s+(.+?)\s*$")


class ToolError(RuntimeError):
    """A tool failed or printed something we cannot parse; carries its output."""


def _run(cmd: list[str], timeout: float, ok_codes: tuple[int, ...] = (0,)) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=TOOL_ENV,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{cmd[0]} timed out after {timeout}s: {' '.join(cmd)}") from exc
    if res.returncode not in ok_codes:
        raise ToolError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def _gdb_core(core: Path, exe: Path, commands: list[str], timeout: float = 60) -> str:
    for path in (core, exe):
        if not Path(path).is_file():
            raise ToolError(f"no such file: {path}")
    args = [a for c in commands for a in ("-ex", c)]
    text = _run([*GDB_BASE, *args, str(exe), str(core)], timeout)
    if "is not a core dump" in text or "not in executable format" in text:
        raise ToolError(f"gdb could not open {core} with {exe}:\n{text}")
    return text


def _split_threads(text: str) -> dict[int, list[str]]:
    """Group gdb 'thread apply all' output lines by LWP."""
    threads: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _THREAD_HDR.match(line):
            current = threads.setdefault(int(m.group(1)), [])
        elif current is not None:
            current.append(line)
    return threads


# ---------------------------------------------------------------- gdb on a core

def gdb_backtraces_text(core: Path, exe: Path) -> str:
    """Raw output of `thread apply all bt` (for failure messages)."""
    return _gdb_core(core, exe, ["thread apply all bt"])


def gdb_backtraces(core: Path, exe: Path) -> dict[int, list[str]]:
    """{lwp: [function of frame #0, #1, ...]}; unknown frames are '??'.

    Inlined frames appear as their own entries, as gdb prints them.
    """
    text = gdb_backtraces_text(core, exe)
    result = {lwp: [m.group(2) for line in lines if (m := _FRAME.match(line))]
              for lwp, lines in _split_threads(text).items()}
    if not result:
        raise ToolError(f"gdb found no threads in {core}:\n{text}")
    return result


def gdb_registers(core: Path, exe: Path) -> dict[int, dict[str, int]]:
    """{lwp: {register: value}} from `info registers general system` (includes orig_rax,
    fs_base, gs_base on x86-64). Values are unsigned as gdb prints them in hex."""
    text = _gdb_core(core, exe, ["thread apply all info registers general system"])
    result = {}
    for lwp, lines in _split_threads(text).items():
        regs = {}
        for line in lines:
            if m := _REG.match(line):
                regs[m.group(1)] = int(m.group(2), 0)
        result[lwp] = regs
    if not result or not any(result.values()):
        raise ToolError(f"gdb printed no registers for {core}:\n{text}")
    return result


def gdb_read_memory(core: Path, exe: Path, addr: int, length: int) -> bytes:
    """Bytes at addr as gdb reads them from the core (`dump binary memory`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mem.bin"
        text = _gdb_core(core, exe, [f"dump binary memory {out} {addr:#x} {addr + length:#x}"])
        if not out.exists() or out.stat().st_size != length:
            raise ToolError(f"gdb could not read {length} bytes at {addr:#x} from {core}:\n{text}")
        return out.read_bytes()


# ---------------------------------------------------------------- elfutils

def eu_stack_text(core: Path, exe: Path) -> str:
    """Raw `eu-stack --core CORE -e EXE` output (exit 1 = some frames had errors: allowed)."""
    return _run(["eu-stack", f"--core={core}", "-e", str(exe)], timeout=60, ok_codes=(0, 1))


def eu_stack(core: Path, exe: Path) -> dict[int, list[str]]:
    """{tid: [function per frame]} from eu-stack; symbol versions (@GLIBC_x) are stripped,
    frames without a symbol are '??'."""
    text = eu_stack_text(core, exe)
    result: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _EU_TID.match(line):
            current = result.setdefault(int(m.group(1)), [])
        elif current is not None and (m := _EU_FRAME.match(line)):
            current.append(m.group(2).split("@")[0] or "??")
    if not result:
        raise ToolError(f"eu-stack found no threads in {core}:\n{text}")
    return result


def eu_readelf_notes(core: Path) -> list[tuple[str, str]]:
    """[(owner, type name)] of every ELF note, e.g. ('CORE', 'PRSTATUS'), ('LINUX',
    'X86_XSTATE'); notes eu-readelf cannot name read '<unknown>: N'."""
    text = _run(["eu-readelf", "-n", str(core)], timeout=60)
    notes = []
    for line in text.splitlines():
        m = _NOTE.match(line)
        if m and m.group(1) != "Owner":
            notes.append((m.group(1), m.group(3)))
    if not notes:
        raise ToolError(f"eu-readelf found no notes in {core}:\n{text}")
    return notes


# ---------------------------------------------------------------- gcore

def gcore(pid: int, out: Path, timeout: float = 120) -> Path:
    """Core of a live process by gdb's gcore. It uses PTRACE_ATTACH (SIGSTOP) and detaches
    at the end: only for tests that accept that. Returns out."""
    out = Path(out)
    text = _run([*GDB_BASE, "-p", str(pid), "-ex", f"gcore {out}"], timeout)
    if not out.exists() or "Saved corefile" not in text:
        raise ToolError(f"gcore of pid {pid} failed:\n{text}")
    return out

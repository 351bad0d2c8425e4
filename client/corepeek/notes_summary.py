"""A human summary of a capture from its notes alone (``corepeek notes``).

:func:`summarize` parses the core's header and notes with pyelftools through
``core.file`` (a NOTES session sends nothing else) and joins them with what the
layout says about each thread and mapping; the result is plain JSON data.
:func:`render_text` prints it.

Addresses and register values are hex strings (``"0x7f..."``): JSON numbers
above 2**53 lose precision in many readers.
"""

from __future__ import annotations

import signal
import struct
from typing import IO, Any, cast

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from .remote import RemoteCore
from .textsafe import safe
from .v1 import capture_pb2 as pb

EM_386, EM_X86_64 = 3, 62

REGISTERS = {
    EM_X86_64: ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
                "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
                "fs_base", "gs_base", "ds", "es", "fs", "gs"),
    EM_386: ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "xds", "xes", "xfs", "xgs",
             "orig_eax", "eip", "xcs", "eflags", "esp", "xss"),
}
_PC_SP = {EM_X86_64: ("rip", "rsp"), EM_386: ("eip", "esp")}

AUXV_NAMES = {
    2: "AT_EXECFD", 3: "AT_PHDR", 4: "AT_PHENT", 5: "AT_PHNUM", 6: "AT_PAGESZ", 7: "AT_BASE",
    8: "AT_FLAGS", 9: "AT_ENTRY", 11: "AT_UID", 12: "AT_EUID", 13: "AT_GID", 14: "AT_EGID",
    15: "AT_PLATFORM", 16: "AT_HWCAP", 17: "AT_CLKTCK", 23: "AT_SECURE", 24: "AT_BASE_PLATFORM",
    25: "AT_RANDOM", 26: "AT_HWCAP2", 27: "AT_RSEQ_FEATURE_SIZE", 28: "AT_RSEQ_ALIGN",
    29: "AT_HWCAP3", 30: "AT_HWCAP4", 31: "AT_EXECFN", 32: "AT_SYSINFO",
    33: "AT_SYSINFO_EHDR", 51: "AT_MINSIGSTKSZ",
}
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP}
_STATE_NAMES = {"R": "running", "S": "sleeping", "D": "disk sleep", "T": "stopped",
                "t": "tracing stop", "Z": "zombie", "X": "dead", "I": "idle"}


def _hex(value: int) -> str:
    return f"{value:#x}"


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        if signal.SIGRTMIN <= num <= signal.SIGRTMAX:
            return f"SIGRTMIN+{num - signal.SIGRTMIN}"
        return f"SIG{num}"


def signal_set(mask: int) -> list[str]:
    """Names of the signals in a kernel sigset word (bit n-1 is signal n)."""
    return [signal_name(n + 1) for n in range(mask.bit_length()) if mask >> n & 1]


def _perms(p_flags: int) -> str:
    return ("r" if p_flags & 4 else "-") + ("w" if p_flags & 2 else "-") + (
        "x" if p_flags & 1 else "-")


# -- note decoding (word size from the ELF class) ---------------------------------------


def decode_prstatus(desc: bytes, elf_class: int, machine: int) -> dict[str, Any]:
    w = "Q" if elf_class == 64 else "I"
    t = "q" if elf_class == 64 else "i"
    head = struct.Struct(f"<iiih2x{w}{w}iiii{t}{t}{t}{t}{t}{t}{t}{t}")
    (signo, code, errno_, cursig, sigpend, sighold, pid, ppid, pgrp, sid,
     *times) = head.unpack_from(desc)
    names = REGISTERS.get(machine, ())
    wsize = struct.calcsize(w)
    count = min(len(names), (len(desc) - head.size) // wsize)
    values = struct.unpack_from(f"<{count}{w}", desc, head.size)
    return {"tid": pid, "ppid": ppid, "pgrp": pgrp, "sid": sid, "cursig": cursig,
            "info": (signo, code, errno_), "sigpend": sigpend, "sighold": sighold,
            "utime_us": times[0] * 1_000_000 + times[1],
            "stime_us": times[2] * 1_000_000 + times[3],
            "registers": dict(zip(names, values))}


def decode_prpsinfo(desc: bytes, elf_class: int) -> dict[str, Any]:
    if elf_class == 64:
        fmt = "<bcbb4xQIIiiii16s80s"
    else:   # i386: 16-bit uid/gid (the kernel's compat elf_prpsinfo)
        fmt = "<bcbbIHHiiii16s80s" if len(desc) == 124 else "<bcbbIIIiiii16s80s"
    (state, sname, zomb, nice, flag, uid, gid, pid, ppid, pgrp, sid, fname,
     psargs) = struct.unpack_from(fmt, desc)
    return {"state": sname.decode(errors="replace"), "state_code": state, "zombie": bool(zomb),
            "nice": nice, "flags": _hex(flag), "uid": uid, "gid": gid, "pid": pid,
            "ppid": ppid, "pgrp": pgrp, "sid": sid,
            "fname": fname.split(b"\0")[0].decode(errors="replace"),
            "psargs": psargs.split(b"\0")[0].decode(errors="replace")}


def decode_siginfo(desc: bytes, elf_class: int) -> dict[str, Any] | None:
    """NT_SIGINFO, or None when no signal (a live capture writes zeros)."""
    if len(desc) < 12:
        return None
    signo, errno_, code = struct.unpack_from("<iii", desc)
    if signo == 0:
        return None
    out: dict[str, Any] = {"signo": signo, "name": signal_name(signo), "code": code,
                           "errno": errno_}
    if signo in _FAULT_SIGNALS:
        off, fmt = (16, "<Q") if elf_class == 64 else (12, "<I")
        if len(desc) >= off + struct.calcsize(fmt):
            out["addr"] = _hex(struct.unpack_from(fmt, desc, off)[0])
    return out


def decode_auxv(desc: bytes, elf_class: int) -> dict[str, str]:
    fmt = "<QQ" if elf_class == 64 else "<II"
    step = struct.calcsize(fmt)
    out: dict[str, str] = {}
    for off in range(0, len(desc) - step + 1, step):
        key, val = struct.unpack_from(fmt, desc, off)
        if key == 0:
            break
        out.setdefault(AUXV_NAMES.get(key, f"AT_{key}"), _hex(val))
    return out


# -- summary ---------------------------------------------------------------------------


def summarize(core: RemoteCore) -> dict[str, Any]:
    """Threads, registers, signals, process info and mappings, from the notes."""
    lay = core.layout
    elf = ELFFile(cast(IO[bytes], core.file))
    elf_class = elf.elfclass
    machine = elf.header["e_machine"]
    machine_num = {"EM_X86_64": EM_X86_64, "EM_386": EM_386}.get(machine, machine)
    pc_name, sp_name = _PC_SP.get(machine_num, ("", ""))
    threads: list[dict[str, Any]] = []
    process: dict[str, Any] = {}
    siginfo: dict[str, Any] | None = None
    auxv: dict[str, str] = {}
    files: dict[int, tuple[str, int]] = {}
    note_counts: dict[str, int] = {}
    loads = []
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD":
            loads.append(segment.header)
            continue
        if not isinstance(segment, NoteSegment):
            continue
        for note in segment.iter_notes():
            ntype = note["n_type"]
            key = ntype if isinstance(ntype, str) else f"{note['n_name']}:{ntype:#x}"
            note_counts[key] = note_counts.get(key, 0) + 1
            desc = bytes(note["n_descdata"])
            if ntype == "NT_PRSTATUS":
                threads.append(decode_prstatus(desc, elf_class, machine_num))
            elif ntype == "NT_PRPSINFO":
                process = decode_prpsinfo(desc, elf_class)
            elif ntype == "NT_SIGINFO":
                siginfo = decode_siginfo(desc, elf_class)
            elif ntype == "NT_AUXV":
                auxv = decode_auxv(desc, elf_class)
            elif ntype == "NT_FILE":
                nt = note["n_desc"]
                page = nt["page_size"]
                for entry, name in zip(nt["Elf_Nt_File_Entry"], nt["filename"]):
                    files[entry["vm_start"]] = (
                        name.decode(errors="replace") if isinstance(name, bytes) else name,
                        entry["page_offset"] * page)

    info = {t.tid: t for t in lay.threads}
    out_threads = []
    for t in threads:
        ti = info.get(t["tid"])
        regs = t["registers"]
        out_threads.append({
            "tid": t["tid"],
            "comm": ti.comm if ti else "",
            "state": ti.state if ti else "",
            "frozen": ti.frozen if ti else bool(regs.get(pc_name)),
            "pc": _hex(regs.get(pc_name, 0)),
            "sp": _hex(regs.get(sp_name, 0)),
            "cursig": signal_name(t["cursig"]) if t["cursig"] else None,
            "pending": signal_set(t["sigpend"]),
            "blocked": signal_set(t["sighold"]),
            "utime_us": t["utime_us"],
            "stime_us": t["stime_us"],
            "registers": {k: _hex(v) for k, v in regs.items()},
        })

    names = {int(s.vaddr): s for s in lay.segments}
    mappings = []
    for p in loads:
        start, size = p["p_vaddr"], p["p_memsz"]
        seg = names.get(start)
        file_name, offset = files.get(start, ("", 0))
        mappings.append({
            "start": _hex(start), "end": _hex(start + size), "size": size,
            "perms": _perms(p["p_flags"]) + ("s" if seg is not None and seg.shared else "p"),
            "offset": offset,
            "name": file_name or (seg.name if seg is not None else ""),
            "in_core": p["p_filesz"],
            "stack": bool(seg.stack) if seg is not None else False,
        })

    return {
        "pid": lay.pid, "comm": lay.comm, "exe": lay.exe, "arch": lay.arch,
        "elf_class": elf_class, "start_time": lay.start_time, "session": lay.session_id,
        "capture_mode": pb.CaptureMode.Name(lay.mode),
        "freeze_micros": lay.freeze_micros, "core_size": lay.total_size,
        "process": process, "signal": siginfo, "threads": out_threads, "auxv": auxv,
        "mappings": mappings, "notes": note_counts,
        "files": mapped_files(lay),
        "bytes_fetched": core.stats.data_bytes,
    }


def mapped_files(lay: pb.CoreLayout) -> list[dict[str, Any]]:
    """The files the target maps (once per inode): path, size, GNU build-id."""
    return [{"id": f.id, "path": f.path, "size": f.size, "build_id": f.build_id or None,
             "elf": f.elf, "deleted": f.deleted, "readable": f.readable}
            for f in lay.files]


def render_text(summary: dict[str, Any]) -> str:
    """The summary as a terminal report; names the target chose are escaped."""
    s = summary
    proc = s.get("process", {})
    lines = [f"pid {s['pid']} ({safe(s['comm'])}) {safe(s['exe'])}  "
             f"[{s['arch']}, ELF{s['elf_class']}]"]
    if proc:
        state = proc.get("state", "")
        lines.append(f"  state {state} ({_STATE_NAMES.get(state, '?')}), ppid {proc['ppid']}, "
                     f"pgrp {proc['pgrp']}, sid {proc['sid']}, uid {proc['uid']}, "
                     f"gid {proc['gid']}, nice {proc['nice']}")
        lines.append(f"  command: {safe(proc['psargs'])}")
    lines.append(f"  {len(s['threads'])} threads, stopped in {s['freeze_micros'] / 1000:.1f} ms; "
                 f"full core would be {s['core_size']} bytes, "
                 f"{s['bytes_fetched']} bytes fetched")
    sig = s.get("signal")
    if sig:
        extra = f" at {sig['addr']}" if "addr" in sig else ""
        lines.append(f"  signal: {sig['name']} code {sig['code']} errno {sig['errno']}{extra}")
    else:
        lines.append("  signal: none (live capture)")
    lines.append("")
    lines.append("threads:")
    lines.append(f"  {'TID':>7} {'ST':2} {'COMM':16} {'PC':>18} {'SP':>18}  SIGNALS")
    for t in s["threads"]:
        sigs = []
        if t["cursig"]:
            sigs.append(f"current {t['cursig']}")
        if t["pending"]:
            sigs.append("pending " + ",".join(x.removeprefix("SIG") for x in t["pending"]))
        if t["blocked"]:
            sigs.append(f"{len(t['blocked'])} blocked")
        state = t["state"] + ("" if t["frozen"] else "!")
        lines.append(f"  {t['tid']:>7} {state:2} {safe(t['comm']):16} {t['pc']:>18} "
                     f"{t['sp']:>18}  {'; '.join(sigs)}")
    if any(not t["frozen"] for t in s["threads"]):
        lines.append("  (!: did not stop in time; registers are zero)")
    lines.append("")
    lines.append("mappings:")
    lines.append(f"  {'START':>18} {'END':>18} {'PERM':4} {'SIZE':>10} {'IN CORE':>10} "
                 f"{'OFFSET':>10}  NAME")
    for m in s["mappings"]:
        name = safe(m["name"]) + ("  (stack)" if m["stack"] and not m["name"].startswith("[stack")
                                  else "")
        lines.append(f"  {m['start']:>18} {m['end']:>18} {m['perms']:4} {_size(m['size']):>10} "
                     f"{_size(m['in_core']):>10} {m['offset']:>#10x}  {name}")
    if s.get("files"):
        lines.append("")
        lines.append("files:")
        lines.append(f"  {'SIZE':>10} {'BUILD-ID':40}  PATH")
        for f in s["files"]:
            lines.append(f"  {_size(f['size']):>10} {f['build_id'] or '-':40}  {f['path']}"
                         + ("  (deleted)" if f["deleted"] else ""))
    if s.get("auxv"):
        lines.append("")
        keys = ("AT_ENTRY", "AT_BASE", "AT_PHDR", "AT_SYSINFO_EHDR", "AT_PAGESZ", "AT_SECURE")
        lines.append("auxv: " + ", ".join(f"{k.removeprefix('AT_')}={s['auxv'][k]}"
                                          for k in keys if k in s["auxv"]))
    return "\n".join(lines)


def _size(n: int) -> str:
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in ("Ki", "Mi", "Gi", "Ti"):
        value /= 1024
        if value < 1024 or unit == "Ti":
            break
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"

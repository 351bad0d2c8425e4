"""NT_X86_XSAVE_LAYOUT: where each XSAVE feature lives in NT_X86_XSTATE.

Since Linux 6.14 the kernel appends this per-process note after the thread
notes so debuggers need not guess the XSAVE layout (it differs between Intel
and AMD CPUs).  ``dump_xsave_layout_desc`` (arch/x86/kernel/fpu/xstate.c)
writes one ``struct x86_xfeat_component {u32 type, size, offset, flags}`` for
every extended feature (bit 2 and up) of ``fpu_user_cfg.max_features``: size
and offset are CPUID(0xD, bit).EAX/EBX, and flags is always 0 ("reserved for
future use") -- not CPUID's ECX, which is non-zero for AMX (64-byte
alignment, XFD).  The mask is the XCR0 word the kernel stores in the
software-reserved bytes of every ptrace/core xstate (USER_XSTATE_XCR0_WORD,
set from that same ``max_features``; gdb reads it there too).  A non-zero
mask without extended features still gets the note, empty, as the kernel
writes it since commit c8161e5304ab.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import struct
from collections.abc import Callable
from functools import cache

from ..elfcore.constants import NoteType

log = logging.getLogger(__name__)

NT_X86_XSAVE_LAYOUT = 0x205
_XCR0_OFFSET = 464              # sw_reserved[USER_XSTATE_XCR0_WORD] of the FXSAVE area
_FIRST_EXTENDED_XFEATURE = 2    # bits 0 and 1 (x87, SSE) live in the legacy area
_XFEAT_COMPONENT = struct.Struct("<IIII")   # struct x86_xfeat_component

# void cpuid(u32 leaf, u32 subleaf, u32 out[4]) for the SysV x86-64 ABI:
# push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53" "89f8" "89f1" "4989d0" "0fa2"
                            "418900" "41895804" "41894808" "4189500c" "5b" "c3")

_CpuidFn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                            ctypes.POINTER(ctypes.c_uint32 * 4))


@cache
def _cpuid_fn() -> _CpuidFn | None:
    """Map the CPUID stub write-then-execute (never writable and executable)."""
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(_CPUID_CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mprotect(ctypes.c_void_p(addr), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC):
            log.warning("cannot map the CPUID stub executable; cores omit NT_X86_XSAVE_LAYOUT")
            return None
        _keep_alive.append(page)
        return _CpuidFn(addr)
    except (OSError, ValueError) as exc:
        log.warning("CPUID unavailable (%s); cores omit NT_X86_XSAVE_LAYOUT", exc)
        return None


_keep_alive: list[mmap.mmap] = []


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    fn = _cpuid_fn()
    if fn is None:
        return None
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, subleaf, ctypes.byref(out))
    return out[0], out[1], out[2], out[3]


def xfeatures_from_xstate(xstate: bytes) -> int | None:
    """The XCR0 user feature mask recorded in an NT_X86_XSTATE buffer."""
    if len(xstate) < _XCR0_OFFSET + 8:
        return None
    (features,) = struct.unpack_from("<Q", xstate, _XCR0_OFFSET)
    return int(features) or None


CpuidLeaf = Callable[[int], tuple[int, int, int, int] | None]


def layout_records(features: int, xstate_leaf: CpuidLeaf) -> bytes | None:
    """The note's desc for an XCR0 mask; ``xstate_leaf(bit)`` is CPUID(0xD, bit).

    None if a sub-leaf cannot be read (the layout would be a guess).
    """
    out = []
    for bit in range(_FIRST_EXTENDED_XFEATURE, 64):
        if not features >> bit & 1:
            continue
        regs = xstate_leaf(bit)
        if regs is None:
            return None
        size, offset, _cpuid_flags, _ = regs
        out.append(_XFEAT_COMPONENT.pack(bit, size, offset, 0))    # flags: reserved, 0
    return b"".join(out)


@cache
def xsave_layout_desc(features: int) -> bytes | None:
    """:func:`layout_records` on this CPU (cached: CPUID does not change)."""
    return layout_records(features, lambda bit: cpuid(0xD, bit))


def xsave_layout_notes(xstate: bytes) -> list[tuple[int, bytes]]:
    """The process-wide extra notes for a thread's NT_X86_XSTATE buffer."""
    features = xfeatures_from_xstate(xstate)
    if features is None:
        return []
    desc = xsave_layout_desc(features)
    return [] if desc is None else [(NT_X86_XSAVE_LAYOUT, desc)]


def extra_notes(regsets: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    for note_type, data in regsets:
        if note_type == NoteType.NT_X86_XSTATE:
            return xsave_layout_notes(data)
    return []

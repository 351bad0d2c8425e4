"""The dynamic linker's shared-library list, found in target memory (pure logic).

A debugger opening a core names the shared libraries by following, in the
core's memory, the chain the dynamic linker keeps for it (the SVR4 ``r_debug``
protocol, glibc's ``<link.h>``)::

    auxv AT_PHDR/AT_PHENT/AT_PHNUM -> the executable's program headers
    PT_PHDR                        -> load bias (AT_PHDR - p_vaddr)
    PT_DYNAMIC                     -> the executable's dynamic section
    DT_DEBUG                       -> struct r_debug {r_version, r_map, r_brk,
                                                      r_state, r_ldbase[, r_next]}
    r_map                          -> struct link_map {l_addr, l_name, l_ld,
                                                       l_next, l_prev} -> l_next ...
    l_name                         -> the object's path (NUL-terminated)
    l_ld                           -> the object's dynamic section

gdb then asks libthread_db for the threads; it reads a handful of variables
it finds by name in the libraries' dynamic symbol tables (glibc 2.34+:
``__nptl_rtld_global`` in libc pointing at ``_rtld_global`` in ld.so, whose
``_dl_stack_used``/``_dl_stack_user`` lists chain the thread descriptors) and
each thread's descriptor (``struct pthread``, ``_thread_db_sizeof_pthread``
bytes at the thread pointer).  :func:`walk` looks those symbols up through
DT_GNU_HASH or DT_HASH; :func:`thread_pointers` takes the thread pointers
from the register notes.

Everything reads through a ``read(vaddr, length) -> bytes`` callable and
returns the ``(vaddr, length)`` ranges a debugger needs, so a partial core can
carry exactly those bytes.  Words are the target's (``word_size`` 4 or 8,
little-endian).  The target's memory is not trusted: every loop is bounded
and a short read ends that branch of the walk instead of failing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .ranges import merge_ranges

ReadFn = Callable[[int, int], bytes]   # may return fewer bytes than asked (unreadable)
VRange = tuple[int, int]              # (vaddr, length)

# auxv keys (<elf.h>)
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_BASE, AT_ENTRY = 0, 3, 4, 5, 7, 9
AT_SYSINFO_EHDR = 33
# program header types, dynamic tags, note types, machines
PT_DYNAMIC, PT_PHDR = 2, 6
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT = 0, 4, 5, 6, 10, 11
DT_DEBUG = 21
DT_GNU_HASH = 0x6FFFFEF5
NT_PRSTATUS, NT_AUXV, NT_386_TLS = 1, 6, 0x200
EM_386, EM_X86_64 = 3, 62

# Variables libthread_db reads to list threads (glibc nptl_db/structs.def),
# each kept whole when a loaded object defines it.
THREAD_DB_SYMBOLS = (
    "_rtld_global",            # ld.so: _dl_stack_used / _dl_stack_user list heads
    "__nptl_rtld_global",      # libc: &_rtld_global
    "__nptl_nthreads",
    "__nptl_last_event",
    "__nptl_threads_events",
    "__stack_user",            # glibc < 2.34 (libpthread)
)
SIZEOF_PTHREAD_SYMBOL = "_thread_db_sizeof_pthread"   # uint32: sizeof (struct pthread)
MAX_DESCRIPTOR = 64 * 1024                             # ignore a larger claimed size
MAX_SYMBOL = 64 * 1024    # a variable claiming to be larger is not kept

MAX_PHNUM = 4096          # more program headers than this is not an executable
MAX_DYN = 4096            # entries scanned in one dynamic section
MAX_OBJECTS = 8192        # link_map nodes followed, all namespaces together
MAX_NAMESPACES = 256      # r_debug_extended.r_next hops
MAX_NAME = 4096           # PATH_MAX: bytes of l_name scanned for its NUL
MAX_CHAIN = 65536         # hash chain steps per symbol lookup
MAX_KEPT = 8 << 20        # bytes a walk may keep: a real one keeps kilobytes; a
                          # target forging its link_map list gets no further
_NAME_STEP = 256
_DYN_BLOCK = 64           # dynamic entries per read


@dataclass(frozen=True)
class LinkMapEntry:
    """One ``struct link_map`` node as the target holds it."""

    address: int
    l_addr: int
    name: str
    l_ld: int
    namespace: int = 0


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    size: int
    object: str           # l_name of the defining object ("" for the executable)


@dataclass(frozen=True)
class DynlinkInfo:
    """What :func:`walk` found, and the memory a debugger reads to find it."""

    ranges: tuple[VRange, ...]            # merged (vaddr, length), address order
    load_bias: int = 0
    dynamic: int = 0                      # the executable's PT_DYNAMIC address
    r_debug: int = 0                      # 0: none (static, or not yet set)
    r_version: int = 0
    objects: tuple[LinkMapEntry, ...] = ()
    symbols: tuple[Symbol, ...] = ()      # THREAD_DB_SYMBOLS found
    sizeof_pthread: int = 0               # 0: libthread_db's descriptor size unknown
    problems: tuple[str, ...] = field(default=())   # why parts of the walk stopped


class _Short(Exception):
    """A read returned fewer bytes than the structure needs."""


# -- notes and auxv --------------------------------------------------------------------


def parse_auxv(raw: bytes, word_size: int) -> dict[int, int]:
    """``{a_type: a_val}`` from raw auxv words, up to AT_NULL (first value wins)."""
    fmt = "<" + ("Q" if word_size == 8 else "I") * 2
    step = 2 * word_size
    out: dict[int, int] = {}
    for off in range(0, len(raw) - step + 1, step):
        key, val = struct.unpack_from(fmt, raw, off)
        if key == AT_NULL:
            break
        out.setdefault(key, val)
    return out


def iter_notes(notes: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """``(owner, type, desc)`` of each note in a PT_NOTE blob (4-byte padding)."""
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        off += 12
        name = notes[off:off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = notes[off:off + descsz]
        off += (descsz + 3) & ~3
        if len(desc) < descsz:
            return
        yield name, ntype, desc


def auxv_from_notes(notes: bytes) -> bytes:
    """The NT_AUXV descriptor of a core's notes (b"" if there is none)."""
    for owner, ntype, desc in iter_notes(notes):
        if ntype == NT_AUXV and owner == b"CORE":
            return desc
    return b""


# x86 thread pointers, from struct elf_prstatus: (offset of pr_reg, register index,
# word size).  x86-64: fs_base.  i386: the gs selector, whose TLS descriptor
# (NT_386_TLS, struct user_desc) holds the base.
_PR_REG = {EM_X86_64: (112, 21, 8), EM_386: (72, 10, 4)}


def thread_pointers(notes: bytes, machine: int) -> list[int]:
    """Each thread's thread pointer (0 if unknown), in NT_PRSTATUS order."""
    if machine not in _PR_REG:
        return []
    pr_reg, index, w = _PR_REG[machine]
    fmt = "<Q" if w == 8 else "<I"
    out: list[int] = []
    selector = -1
    for owner, ntype, desc in iter_notes(notes):
        if owner != b"CORE" and ntype == NT_PRSTATUS:
            continue
        if ntype == NT_PRSTATUS and owner == b"CORE":
            value = 0
            if len(desc) >= pr_reg + (index + 1) * w:
                (value,) = struct.unpack_from(fmt, desc, pr_reg + index * w)
            if machine == EM_386:
                selector, value = value & 0xFFFF, 0
            out.append(value)
        elif ntype == NT_386_TLS and machine == EM_386 and out and selector > 0:
            for off in range(0, len(desc) - 15, 16):
                entry, base = struct.unpack_from("<II", desc, off)
                if entry == selector >> 3:
                    out[-1] = base
    return out


def descriptor_ranges(pointers: Iterable[int], size: int) -> list[VRange]:
    """``struct pthread`` of each thread: ``size`` bytes at its thread pointer."""
    if not 0 < size <= MAX_DESCRIPTOR:
        return []
    return [(tp, size) for tp in pointers if tp]


def merge_vranges(ranges: Iterable[VRange]) -> tuple[VRange, ...]:
    return tuple(merge_ranges(ranges))


# -- reading target structures -----------------------------------------------------------


class _Walker:
    def __init__(self, read: ReadFn, word_size: int) -> None:
        if word_size not in (4, 8):
            raise ValueError(f"word size must be 4 or 8, not {word_size}")
        self._read = read
        self.w = word_size
        self.wfmt = "Q" if word_size == 8 else "I"
        self.mask = (1 << (8 * word_size)) - 1
        self.ranges: list[VRange] = []
        self.problems: list[str] = []
        self.kept = 0

    def read(self, vaddr: int, length: int, *, keep: bool = True) -> bytes:
        if vaddr <= 0 or vaddr + length - 1 > self.mask:
            raise _Short(f"address {vaddr:#x} outside the target's address space")
        data = self._read(vaddr, length)
        if len(data) < length:
            raise _Short(f"{length} bytes at {vaddr:#x} unreadable")
        if keep:
            self.keep(vaddr, length)
        return bytes(data[:length])

    def keep(self, vaddr: int, length: int) -> None:
        self.kept += length
        if self.kept > MAX_KEPT:
            raise _Short(f"the walk kept more than {MAX_KEPT} bytes")
        self.ranges.append((vaddr, length))

    def words(self, vaddr: int, count: int, *, keep: bool = True) -> tuple[int, ...]:
        return struct.unpack(f"<{count}{self.wfmt}",
                             self.read(vaddr, count * self.w, keep=keep))

    def u32(self, vaddr: int) -> int:
        return int(struct.unpack("<I", self.read(vaddr, 4, keep=False))[0])

    def string(self, vaddr: int, *, keep: bool = True, limit: int = MAX_NAME) -> bytes:
        """A NUL-terminated string, without the NUL; keeps its bytes including the NUL."""
        got = b""
        while len(got) < limit:
            n = min(_NAME_STEP, limit - len(got))
            chunk = self._read(vaddr + len(got), n) if vaddr > 0 else b""
            if not chunk:
                raise _Short(f"string at {vaddr:#x} unreadable after {len(got)} bytes")
            end = chunk.find(b"\0")
            if end >= 0:
                got += chunk[:end + 1]
                if keep:
                    self.keep(vaddr, len(got))
                return got[:-1]
            got += chunk
        raise _Short(f"string at {vaddr:#x} longer than {limit} bytes")

    def dynamic(self, vaddr: int, size: int = 0) -> dict[int, int]:
        """Scan a dynamic section up to DT_NULL.

        Keeps the entries read up to DT_NULL, or the whole ``size`` bytes when
        the section's size is known (a debugger reads the whole section).  Reads
        in blocks, so a ``read`` that is a network round trip pays few of them.
        """
        entry = 2 * self.w
        limit = max(1, min(MAX_DYN, size // entry)) if size else MAX_DYN
        fmt = "<" + 2 * self.wfmt
        tags: dict[int, int] = {}
        done = 0
        while done < limit:
            want = min(_DYN_BLOCK, limit - done)
            base = vaddr + done * entry
            raw = self._read(base, want * entry) if base > 0 else b""
            got = len(raw) // entry
            if got == 0:
                raise _Short(f"dynamic entry at {base:#x} unreadable")
            for i in range(got):
                tag, val = struct.unpack_from(fmt, raw, i * entry)
                if tag == DT_NULL:
                    self.keep(vaddr, max(size, (done + i + 1) * entry))
                    return tags
                tags.setdefault(tag, val)
            done += got
        self.keep(vaddr, done * entry)
        return tags

    def phdrs(self, at_phdr: int, phent: int, phnum: int) -> list[tuple[int, int, int]]:
        """``(p_type, p_vaddr, p_memsz)`` of the program headers at AT_PHDR."""
        if phent not in (32, 56) or not 0 < phnum <= MAX_PHNUM:
            raise _Short(f"implausible program headers: phent {phent}, phnum {phnum}")
        raw = self.read(at_phdr, phent * phnum)
        out = []
        for i in range(phnum):
            off = i * phent
            if self.w == 8:
                p_type, _flags, _off, p_vaddr, _pa, _fsz, p_memsz, _al = struct.unpack_from(
                    "<IIQQQQQQ", raw, off)
            else:
                p_type, _off, p_vaddr, _pa, _fsz, p_memsz, _flags, _al = struct.unpack_from(
                    "<IIIIIIII", raw, off)
            out.append((p_type, p_vaddr, p_memsz))
        return out


# -- the walk ----------------------------------------------------------------------------


@dataclass
class _Found:
    load_bias: int = 0
    dynamic: int = 0
    r_debug: int = 0
    r_version: int = 0
    objects: list[tuple[LinkMapEntry, dict[int, int]]] = field(default_factory=list)
    symbols: list[Symbol] = field(default_factory=list)
    sizeof_pthread: int = 0


def walk(read: ReadFn, auxv: Mapping[int, int] | bytes, word_size: int,
         symbols: Iterable[str] = THREAD_DB_SYMBOLS) -> DynlinkInfo:
    """Follow auxv -> PT_DYNAMIC -> DT_DEBUG -> r_debug -> link_map chain,
    then look up ``symbols`` (kept whole) and libthread_db's descriptor size.

    ``auxv`` is the parsed ``{a_type: a_val}`` or the raw NT_AUXV bytes.  Never
    raises for bad target memory: what could not be followed is listed in
    ``problems`` and the ranges read up to there are still returned.
    """
    if isinstance(auxv, (bytes, bytearray, memoryview)):
        auxv = parse_auxv(bytes(auxv), word_size)
    wk = _Walker(read, word_size)
    found = _Found()
    try:
        _walk_exec(wk, auxv, found)
    except _Short as exc:
        wk.problems.append(str(exc))
    if found.objects:
        _find_symbols(wk, found, tuple(symbols))
    return DynlinkInfo(ranges=merge_vranges(wk.ranges), load_bias=found.load_bias,
                       dynamic=found.dynamic, r_debug=found.r_debug,
                       r_version=found.r_version,
                       objects=tuple(entry for entry, _ in found.objects),
                       symbols=tuple(found.symbols), sizeof_pthread=found.sizeof_pthread,
                       problems=tuple(wk.problems))


def _walk_exec(wk: _Walker, auxv: Mapping[int, int], found: _Found) -> None:
    at_phdr, phent, phnum = auxv.get(AT_PHDR, 0), auxv.get(AT_PHENT, 0), auxv.get(AT_PHNUM, 0)
    if not at_phdr:
        raise _Short("auxv has no AT_PHDR")
    phdrs = wk.phdrs(at_phdr, phent, phnum)
    # glibc's rtld: the bias is AT_PHDR - PT_PHDR's p_vaddr; no PT_PHDR means
    # an executable linked at its run address.
    found.load_bias = next(((at_phdr - v) & wk.mask for t, v, _ in phdrs if t == PT_PHDR), 0)
    dyn = next((((v + found.load_bias) & wk.mask, m) for t, v, m in phdrs if t == PT_DYNAMIC),
               None)
    if dyn is None:
        raise _Short("the executable has no PT_DYNAMIC (static)")
    found.dynamic = dyn[0]
    tags = wk.dynamic(dyn[0], min(dyn[1], MAX_DYN * 2 * wk.w))
    found.r_debug = tags.get(DT_DEBUG, 0)
    if not found.r_debug:
        raise _Short("DT_DEBUG is 0 (static executable, or the dynamic linker has not run)")
    seen: set[int] = set()
    ns_addr, namespace = found.r_debug, 0
    while ns_addr and namespace < MAX_NAMESPACES:
        seen.add(ns_addr)
        # r_version is an int in the first word, r_state an int in the fourth;
        # r_debug_extended (r_version >= 2) adds r_next, the next namespace.
        head = wk.words(ns_addr, 5)
        version = head[0] & 0xFFFFFFFF
        if namespace == 0:
            found.r_version = version
        next_ns = wk.words(ns_addr + 5 * wk.w, 1)[0] if version >= 2 else 0
        try:
            _walk_link_maps(wk, head[1], namespace, found.objects, seen)
        except _Short as exc:
            wk.problems.append(f"namespace {namespace}: {exc}")
        if next_ns in seen:
            break
        ns_addr, namespace = next_ns, namespace + 1


def _walk_link_maps(wk: _Walker, node: int, namespace: int,
                    objects: list[tuple[LinkMapEntry, dict[int, int]]], seen: set[int]) -> None:
    while node and node not in seen:
        if len(objects) >= MAX_OBJECTS:
            raise _Short(f"more than {MAX_OBJECTS} link_map nodes")
        seen.add(node)
        l_addr, l_name, l_ld, l_next, _l_prev = wk.words(node, 5)
        name = ""
        if l_name:
            try:
                name = wk.string(l_name).decode(errors="surrogateescape")
            except _Short as exc:
                wk.problems.append(f"l_name of {node:#x}: {exc}")
        tags: dict[int, int] = {}
        if l_ld:
            try:
                tags = wk.dynamic(l_ld)
            except _Short as exc:
                wk.problems.append(f"l_ld of {node:#x}: {exc}")
        objects.append((LinkMapEntry(node, l_addr, name, l_ld, namespace), tags))
        node = l_next


# -- dynamic symbols ------------------------------------------------------------------------


def gnu_hash(name: bytes) -> int:
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


def sysv_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def _find_symbols(wk: _Walker, found: _Found, names: tuple[str, ...]) -> None:
    wanted = [n for n in names] + [SIZEOF_PTHREAD_SYMBOL]
    for entry, tags in found.objects:
        if not wanted:
            break
        try:
            table = _SymbolTable(wk, entry.l_addr, tags)
        except _Short:
            continue
        if not table.usable:
            continue
        for name in list(wanted):
            try:
                hit = table.lookup(name.encode())
            except _Short as exc:
                wk.problems.append(f"looking up {name} in {entry.name or 'the executable'}: {exc}")
                continue
            if hit is None:
                continue
            wanted.remove(name)
            address, size = hit
            if name == SIZEOF_PTHREAD_SYMBOL:
                try:
                    found.sizeof_pthread = wk.u32(address)
                except _Short as exc:
                    wk.problems.append(f"{name}: {exc}")
                continue
            found.symbols.append(Symbol(name, address, size, entry.name))
            if size > MAX_SYMBOL:
                wk.problems.append(f"{name}: {size} bytes, more than {MAX_SYMBOL}: not kept")
            elif size:
                try:
                    wk.read(address, size)
                except _Short as exc:
                    wk.problems.append(f"{name}: {exc}")


class _SymbolTable:
    """One object's dynamic symbol table, read through its in-memory dynamic section."""

    def __init__(self, wk: _Walker, l_addr: int, tags: Mapping[int, int]) -> None:
        self.wk = wk
        self.l_addr = l_addr

        def addr(tag: int) -> int:
            # glibc relocates DT_* pointers in place, except in read-only dynamic
            # sections (the vDSO's): an offset below the load address is unrelocated.
            val = tags.get(tag, 0)
            return (val + l_addr) & wk.mask if val and val < l_addr else val

        self.symtab, self.strtab = addr(DT_SYMTAB), addr(DT_STRTAB)
        self.gnu, self.sysv = addr(DT_GNU_HASH), addr(DT_HASH)
        self.strsz = tags.get(DT_STRSZ, 0)
        self.syment = tags.get(DT_SYMENT, 24 if wk.w == 8 else 16)
        self.usable = bool(self.symtab and self.strtab and (self.gnu or self.sysv)
                           and self.syment in (16, 24))

    def lookup(self, name: bytes) -> tuple[int, int] | None:
        """(address, size) of a defined symbol ``name``, or None."""
        candidates = self._gnu(name) if self.gnu else self._sysv(name)
        for index in candidates:
            st_name, st_value, st_size, st_shndx = self._sym(index)
            if st_shndx == 0 or st_value == 0 or (self.strsz and st_name >= self.strsz):
                continue
            if self.wk.string(self.strtab + st_name, keep=False, limit=len(name) + 1) == name:
                return (st_value + self.l_addr) & self.wk.mask, st_size
        return None

    def _sym(self, index: int) -> tuple[int, int, int, int]:
        raw = self.wk.read(self.symtab + index * self.syment, self.syment, keep=False)
        if self.wk.w == 8:
            st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", raw)
        else:
            st_name, value, size, _info, _other, shndx = struct.unpack_from("<IIIBBH", raw)
        return st_name, value, size, shndx

    def _gnu(self, name: bytes) -> Iterator[int]:
        wk, base = self.wk, self.gnu
        nbuckets, symoffset, bloom_size, bloom_shift = struct.unpack(
            "<4I", wk.read(base, 16, keep=False))
        if not nbuckets or not bloom_size or bloom_size > (1 << 24) or nbuckets > (1 << 24):
            return
        h = gnu_hash(name)
        bits = 8 * wk.w
        (word,) = wk.words(base + 16 + ((h // bits) % bloom_size) * wk.w, 1, keep=False)
        mask = (1 << (h % bits)) | (1 << ((h >> bloom_shift) % bits))
        if word & mask != mask:
            return
        buckets = base + 16 + bloom_size * wk.w
        index = wk.u32(buckets + (h % nbuckets) * 4)
        if index < symoffset:
            return
        chain = buckets + nbuckets * 4
        for _ in range(MAX_CHAIN):
            value = wk.u32(chain + (index - symoffset) * 4)
            if (value | 1) == (h | 1):
                yield index
            if value & 1:
                return
            index += 1

    def _sysv(self, name: bytes) -> Iterator[int]:
        wk, base = self.wk, self.sysv
        nbucket, nchain = struct.unpack("<II", wk.read(base, 8, keep=False))
        if not nbucket:
            return
        index = wk.u32(base + 8 + (sysv_hash(name) % nbucket) * 4)
        for _ in range(min(nchain, MAX_CHAIN)):
            if index == 0 or index >= nchain:
                return
            yield index
            index = wk.u32(base + 8 + (nbucket + index) * 4)


# -- everything a STACKS core carries besides stacks and ELF header pages -----------------


def debugger_ranges(read: ReadFn, notes: bytes, word_size: int,
                    machine: int) -> tuple[tuple[VRange, ...], DynlinkInfo]:
    """Target memory a debugger reads to name libraries and threads, from a core's notes.

    The dynamic linker walk (:func:`walk`, started from NT_AUXV) plus each
    thread's descriptor when libthread_db's descriptor size was found.
    Returns the merged ``(vaddr, length)`` ranges and the walk's findings.
    """
    info = walk(read, auxv_from_notes(notes), word_size)
    tcbs = descriptor_ranges(thread_pointers(notes, machine), info.sizeof_pthread)
    return merge_vranges(list(info.ranges) + tcbs), info

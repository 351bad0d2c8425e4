"""dynlink: the r_debug / link_map walk and symbol lookups, on synthetic memory.

A small address-space model holds an executable's program headers and dynamic
section, r_debug, link_map nodes, names and per-object symbol tables built
with real GNU and SysV hash tables.  One test walks this very process through
/proc/self/mem and checks the answers against what ctypes and /proc say.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import struct
from pathlib import Path

import pytest

from corepeek_format import dynlink as dl
from corepeek_agent.elfcore.notes import encode_note


class Space:
    """Sparse target memory: placed blobs; a read stops at the first gap."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []

    def put(self, addr: int, data: bytes) -> int:
        self.blobs[addr] = bytearray(data)
        return addr

    def read(self, vaddr: int, length: int) -> bytes:
        self.reads.append((vaddr, length))
        out = bytearray()
        starts = sorted(self.blobs)
        while len(out) < length:
            v = vaddr + len(out)
            i = bisect.bisect_right(starts, v) - 1
            if i < 0:
                break
            blob = self.blobs[starts[i]]
            off = v - starts[i]
            if off >= len(blob):
                break
            out += blob[off:off + length - len(out)]
        return bytes(out)


class Target:
    """Builds the structures of a dynamically linked process in a Space."""

    def __init__(self, word: int) -> None:
        self.w = word
        self.f = "Q" if word == 8 else "I"
        self.space = Space()
        big = word == 8
        self.bias = 0x5555_0000_0000 if big else 0x5655_0000
        self.libc = 0x7F00_0000_0000 if big else 0xF700_0000
        self.ld = 0x7F00_1000_0000 if big else 0xF710_0000
        self.heap = 0x5555_1000_0000 if big else 0x5700_0000
        self.kept: list[tuple[int, int]] = []

    def words(self, *values: int) -> bytes:
        return struct.pack(f"<{len(values)}{self.f}", *values)

    def dyn(self, *pairs: tuple[int, int]) -> bytes:
        return b"".join(self.words(t, v) for t, v in pairs)

    def phdrs(self, entries: list[tuple[int, int, int]]) -> bytes:
        out = b""
        for p_type, vaddr, memsz in entries:
            if self.w == 8:
                out += struct.pack("<IIQQQQQQ", p_type, 4, 0, vaddr, vaddr, memsz, memsz, 8)
            else:
                out += struct.pack("<IIIIIIII", p_type, 0, vaddr, vaddr, memsz, memsz, 4, 4)
        return out

    def symtab(self, base: int, symbols: list[tuple[str, int, int]], hash_kind: str) -> list[
            tuple[int, int]]:
        """Place .dynsym/.dynstr/hash at base; returns the dynamic entries."""
        strtab = b"\0"
        offsets = []
        for name, _, _ in symbols:
            offsets.append(len(strtab))
            strtab += name.encode() + b"\0"
        if hash_kind == "gnu":
            nb = 3
            order = sorted(range(len(symbols)),
                           key=lambda i: dl.gnu_hash(symbols[i][0].encode()) % nb)
            symbols = [symbols[i] for i in order]
            offsets = [offsets[i] for i in order]
        syms = [self._sym(0, 0, 0, 0)]
        syms += [self._sym(off, value, size, 7) for off, (_, value, size) in zip(offsets, symbols)]
        symaddr, straddr, hashaddr = base, base + 0x1000, base + 0x2000
        self.space.put(symaddr, b"".join(syms))
        self.space.put(straddr, strtab)
        if hash_kind == "gnu":
            table = self._gnu_table([n.encode() for n, _, _ in symbols], symoffset=1, nb=3)
            tag = dl.DT_GNU_HASH
        else:
            table = self._sysv_table([n.encode() for n, _, _ in symbols])
            tag = dl.DT_HASH
        self.space.put(hashaddr, table)
        return [(dl.DT_SYMTAB, symaddr), (dl.DT_STRTAB, straddr), (dl.DT_STRSZ, len(strtab)),
                (dl.DT_SYMENT, 24 if self.w == 8 else 16), (tag, hashaddr)]

    def _sym(self, name: int, value: int, size: int, shndx: int) -> bytes:
        if self.w == 8:
            return struct.pack("<IBBHQQ", name, 0x11, 0, shndx, value, size)
        return struct.pack("<IIIBBH", name, value, size, 0x11, 0, shndx)

    def _gnu_table(self, names: list[bytes], symoffset: int, nb: int) -> bytes:
        bits, shift = 8 * self.w, 6
        hashes = [dl.gnu_hash(n) for n in names]
        bloom = 0
        for h in hashes:
            bloom |= (1 << (h % bits)) | (1 << ((h >> shift) % bits))
        buckets = [0] * nb
        for i, h in enumerate(hashes):
            if buckets[h % nb] == 0:
                buckets[h % nb] = i + symoffset
        chain = []
        for i, h in enumerate(hashes):
            last = i + 1 == len(hashes) or hashes[i + 1] % nb != h % nb
            chain.append((h & ~1) | (1 if last else 0))
        return (struct.pack("<4I", nb, symoffset, 1, shift) + self.words(bloom)
                + struct.pack(f"<{nb}I", *buckets) + struct.pack(f"<{len(chain)}I", *chain))

    def _sysv_table(self, names: list[bytes]) -> bytes:
        nbucket, nchain = 2, len(names) + 1
        buckets, chains = [0] * nbucket, [0] * nchain
        for i, n in enumerate(names, start=1):
            b = dl.sysv_hash(n) % nbucket
            chains[i], buckets[b] = buckets[b], i
        return struct.pack(f"<{2 + nbucket + nchain}I", nbucket, nchain, *buckets, *chains)

    def keep(self, addr: int, length: int) -> None:
        self.kept.append((addr, length))

    def build(self, *, r_version: int = 1, names: bool = True) -> dict[str, int]:
        w, sp = self.w, self.space
        ehdr = 64 if w == 8 else 52
        phent = 56 if w == 8 else 32
        exe_dyn = self.bias + 0x3000
        dyn_memsz = 6 * 2 * w
        ph = self.phdrs([(dl.PT_PHDR, ehdr, 3 * phent), (1, 0, 0x4000),
                         (dl.PT_DYNAMIC, 0x3000, dyn_memsz)])
        sp.put(self.bias + ehdr, ph)
        self.keep(self.bias + ehdr, len(ph))
        r_debug = self.ld + 0x9000
        exe_dyn_bytes = self.dyn((1, 5), (dl.DT_DEBUG, r_debug), (0, 0))
        sp.put(exe_dyn, exe_dyn_bytes.ljust(dyn_memsz, b"\0"))
        self.keep(exe_dyn, dyn_memsz)                     # whole PT_DYNAMIC
        libc_tags = self.symtab(self.libc + 0x1000, [
            ("__nptl_rtld_global", 0x5000, w), ("_thread_db_sizeof_pthread", 0x6000, 4),
            ("__nptl_nthreads", 0x5010, 4), ("printf", 0x700, 100)], "gnu")
        sp.put(self.libc + 0x6000, struct.pack("<I", 2368))
        sp.put(self.libc + 0x5000, bytes(0x20))
        self.keep(self.libc + 0x5000, w)
        self.keep(self.libc + 0x5010, 4)
        libc_dyn = self.libc + 0x8000
        sp.put(libc_dyn, self.dyn(*libc_tags, (0, 0)))
        self.keep(libc_dyn, (len(libc_tags) + 1) * 2 * w)
        ld_tags = self.symtab(self.ld + 0x1000, [("_rtld_global", 0xA000, 300),
                                                 ("_r_debug", 0x9000, 5 * w)], "sysv")
        sp.put(self.ld + 0xA000, bytes(300))
        self.keep(self.ld + 0xA000, 300)
        ld_dyn = self.ld + 0x8000
        sp.put(ld_dyn, self.dyn(*ld_tags, (0, 0)))
        self.keep(ld_dyn, (len(ld_tags) + 1) * 2 * w)
        # names and link_map nodes on the "heap"
        n_exe, n_libc, n_ld = self.heap + 0x100, self.heap + 0x200, self.heap + 0x300
        if names:
            for addr, text in ((n_exe, b""), (n_libc, b"/lib/libc.so.6"), (n_ld, b"/lib/ld.so")):
                sp.put(addr, text + b"\0garbage")
                self.keep(addr, len(text) + 1)
        lm = [self.heap + 0x1000, self.heap + 0x1100, self.heap + 0x1200]
        links = [(0, n_exe, exe_dyn), (self.libc, n_libc, libc_dyn), (self.ld, n_ld, ld_dyn)]
        for i, (addr, (l_addr, l_name, l_ld)) in enumerate(zip(lm, links)):
            nxt = lm[i + 1] if i + 1 < len(lm) else 0
            prv = lm[i - 1] if i else 0
            sp.put(addr, self.words(l_addr, l_name, l_ld, nxt, prv) + b"\xff" * 64)
            self.keep(addr, 5 * w)
        sp.put(r_debug, self.words(r_version, lm[0], 0x1234, 0, self.ld, 0))
        self.keep(r_debug, (6 if r_version >= 2 else 5) * w)
        auxv = {dl.AT_PHDR: self.bias + ehdr, dl.AT_PHENT: phent, dl.AT_PHNUM: 3,
                dl.AT_BASE: self.ld}
        return auxv


@pytest.fixture(params=[8, 4], ids=["64-bit", "32-bit"])
def target(request: pytest.FixtureRequest) -> Target:
    return Target(request.param)


def test_given_a_dynamic_process_when_walked_then_every_structure_is_found_and_kept(
        target: Target) -> None:
    auxv = target.build()

    info = dl.walk(target.space.read, auxv, target.w)

    assert info.problems == ()
    assert info.load_bias == target.bias
    assert info.dynamic == target.bias + 0x3000
    assert info.r_debug == target.ld + 0x9000 and info.r_version == 1
    assert [(o.name, o.l_addr) for o in info.objects] == [
        ("", 0), ("/lib/libc.so.6", target.libc), ("/lib/ld.so", target.ld)]
    assert {s.name: (s.address, s.size) for s in info.symbols} == {
        "__nptl_rtld_global": (target.libc + 0x5000, target.w),
        "__nptl_nthreads": (target.libc + 0x5010, 4),
        "_rtld_global": (target.ld + 0xA000, 300)}
    assert info.sizeof_pthread == 2368
    assert info.ranges == dl.merge_vranges(target.kept)


def test_symbol_tables_are_read_but_not_kept(target: Target) -> None:
    auxv = target.build()
    info = dl.walk(target.space.read, auxv, target.w)
    for table in (target.libc + 0x1000, target.libc + 0x2000, target.libc + 0x3000,
                  target.libc + 0x6000, target.ld + 0x1000, target.ld + 0x3000):
        assert not any(a <= table < a + n for a, n in info.ranges), hex(table)


def test_raw_auxv_bytes_work_like_the_parsed_auxv(target: Target) -> None:
    auxv = target.build()
    raw = b"".join(target.words(k, v) for k, v in auxv.items()) + target.words(0, 0)
    assert dl.parse_auxv(raw, target.w) == auxv
    assert dl.walk(target.space.read, raw, target.w) == dl.walk(target.space.read, auxv,
                                                                 target.w)


def test_a_namespace_list_is_followed_through_r_next(target: Target) -> None:
    auxv = target.build(r_version=2)
    # a second namespace with one object, reached through r_debug_extended.r_next
    ns2 = target.heap + 0x5000
    node = target.heap + 0x5100
    name = target.heap + 0x5200
    target.space.put(name, b"/lib/other.so\0")
    target.space.put(node, target.words(0x1000, name, 0, 0, 0))
    target.space.put(ns2, target.words(2, node, 0, 0, 0, 0))
    r_debug = target.ld + 0x9000
    target.space.put(r_debug, target.words(2, target.heap + 0x1000, 0x1234, 0, target.ld, ns2))

    info = dl.walk(target.space.read, auxv, target.w)

    assert [(o.name, o.namespace) for o in info.objects][-1] == ("/lib/other.so", 1)
    assert len(info.objects) == 4
    assert any(a <= ns2 and ns2 + 6 * target.w <= a + n for a, n in info.ranges)


def test_a_cyclic_link_map_list_ends(target: Target) -> None:
    auxv = target.build()
    last = target.heap + 0x1200
    # ld.so's l_next points back at the first node
    target.space.put(last, target.words(target.ld, target.heap + 0x300, target.ld + 0x8000,
                                        target.heap + 0x1000, 0))
    info = dl.walk(target.space.read, auxv, target.w)
    assert len(info.objects) == 3


def test_a_walk_keeps_a_bounded_number_of_bytes(target: Target,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    auxv = target.build()
    whole = dl.walk(target.space.read, auxv, target.w)
    monkeypatch.setattr(dl, "MAX_KEPT", 200)
    capped = dl.walk(target.space.read, auxv, target.w)
    assert sum(n for _, n in capped.ranges) <= 200 < sum(n for _, n in whole.ranges)
    assert any("kept more than 200" in p for p in capped.problems)


def test_a_symbol_claiming_a_huge_size_is_found_but_not_kept(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    auxv = target.build()
    monkeypatch.setattr(dl, "MAX_SYMBOL", 299)            # _rtld_global here has 300 bytes
    info = dl.walk(target.space.read, auxv, target.w)
    assert "_rtld_global" in {s.name for s in info.symbols}
    assert not any(a <= target.ld + 0xA000 < a + n for a, n in info.ranges)
    assert any("_rtld_global: 300 bytes" in p for p in info.problems)


def test_an_unreadable_name_is_reported_and_the_walk_goes_on(target: Target) -> None:
    auxv = target.build(names=False)
    info = dl.walk(target.space.read, auxv, target.w)
    assert [o.name for o in info.objects] == ["", "", ""]
    assert len(info.problems) == 3 and all("l_name" in p for p in info.problems)
    assert info.sizeof_pthread == 2368


def test_a_static_executable_gives_only_its_program_headers(target: Target) -> None:
    auxv = target.build()
    ehdr = 64 if target.w == 8 else 52
    phent = 56 if target.w == 8 else 32
    target.space.put(target.bias + ehdr, target.phdrs([(dl.PT_PHDR, ehdr, phent), (1, 0, 1)]))
    auxv[dl.AT_PHNUM] = 2
    info = dl.walk(target.space.read, auxv, target.w)
    assert info.r_debug == 0 and info.objects == ()
    assert info.ranges == ((target.bias + ehdr, 2 * phent),)
    assert "static" in info.problems[0]


def test_dt_debug_zero_means_no_library_list(target: Target) -> None:
    auxv = target.build()
    target.space.put(target.bias + 0x3000, target.dyn((1, 5), (dl.DT_DEBUG, 0), (0, 0)))
    info = dl.walk(target.space.read, auxv, target.w)
    assert info.r_debug == 0 and info.objects == () and "DT_DEBUG" in info.problems[0]


@pytest.mark.parametrize("auxv", [{}, {dl.AT_PHDR: 0x1000, dl.AT_PHENT: 0, dl.AT_PHNUM: 3},
                                  {dl.AT_PHDR: 0x1000, dl.AT_PHENT: 56, dl.AT_PHNUM: 10 ** 6}])
def test_implausible_auxv_is_a_problem_not_an_exception(auxv: dict[int, int]) -> None:
    info = dl.walk(lambda v, n: bytes(n), auxv, 8)
    assert info.ranges == () and info.problems


def test_memory_that_reads_nothing_is_a_problem_not_an_exception() -> None:
    auxv = {dl.AT_PHDR: 0x1000, dl.AT_PHENT: 56, dl.AT_PHNUM: 4}
    info = dl.walk(lambda v, n: b"", auxv, 8)
    assert info.ranges == () and info.problems


def test_hash_functions_match_the_elf_specifications() -> None:
    assert dl.gnu_hash(b"") == 5381
    assert dl.gnu_hash(b"printf") == 0x156B2BB8
    assert dl.sysv_hash(b"printf") == 0x077905A6
    assert dl.sysv_hash(b"") == 0


def _prstatus_x86_64(tid: int, fs_base: int) -> bytes:
    regs = [0] * 27
    regs[21] = fs_base
    body = struct.pack("<iiih2xQQiiii", 0, 0, 0, 0, 0, 0, tid, 1, 1, 1) + bytes(64)
    return encode_note(dl.NT_PRSTATUS, body + struct.pack("<27Q", *regs) + bytes(8))


def _prstatus_i386(tid: int, gs: int) -> bytes:
    regs = [0] * 17
    regs[10] = gs
    body = struct.pack("<iiih2xIIiiii", 0, 0, 0, 0, 0, 0, tid, 1, 1, 1) + bytes(32)
    return encode_note(dl.NT_PRSTATUS, body + struct.pack("<17I", *regs) + bytes(4))


def test_thread_pointers_come_from_fs_base_on_x86_64() -> None:
    notes = (_prstatus_x86_64(10, 0x7F00_0000_0740) + encode_note(6, bytes(32))
             + encode_note(dl.NT_386_TLS, bytes(16)) + _prstatus_x86_64(11, 0))
    assert dl.thread_pointers(notes, dl.EM_X86_64) == [0x7F00_0000_0740, 0]
    assert dl.descriptor_ranges([0x7F00_0000_0740, 0], 2368) == [(0x7F00_0000_0740, 2368)]
    assert dl.descriptor_ranges([0x1000], 0) == []
    assert dl.descriptor_ranges([0x1000], dl.MAX_DESCRIPTOR + 1) == []


def test_thread_pointers_come_from_the_gs_tls_descriptor_on_i386() -> None:
    gs = (12 << 3) | 3
    tls = struct.pack("<IIII", 12, 0xF7F6F5C0, 0xFFFFF, 0x51) + struct.pack(
        "<IIII", 13, 0x1234, 0, 0)
    notes = (_prstatus_i386(20, gs) + encode_note(dl.NT_386_TLS, tls)
             + _prstatus_i386(21, (13 << 3) | 3) + encode_note(dl.NT_386_TLS, tls)
             + _prstatus_i386(22, 0))
    assert dl.thread_pointers(notes, dl.EM_386) == [0xF7F6F5C0, 0x1234, 0]
    assert dl.thread_pointers(notes, 183) == []          # an architecture it does not know


def test_debugger_ranges_add_thread_descriptors_to_the_walk(target: Target) -> None:
    auxv = target.build()
    raw = b"".join(target.words(k, v) for k, v in auxv.items()) + target.words(0, 0)
    if target.w == 8:
        notes = _prstatus_x86_64(1, target.heap + 0x8000) + encode_note(dl.NT_AUXV, raw)
        machine = dl.EM_X86_64
    else:
        gs = (12 << 3) | 3
        notes = (_prstatus_i386(1, gs) + encode_note(dl.NT_AUXV, raw)
                 + encode_note(dl.NT_386_TLS, struct.pack("<IIII", 12, target.heap + 0x8000,
                                                          0, 0)))
        machine = dl.EM_386
    ranges, info = dl.debugger_ranges(target.space.read, notes, target.w, machine)
    assert ranges == dl.merge_vranges(list(info.ranges) + [(target.heap + 0x8000, 2368)])


# -- this very process ------------------------------------------------------------------


def _self_reader():  # type: ignore[no-untyped-def]
    fd = os.open("/proc/self/mem", os.O_RDONLY)

    def read(vaddr: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            try:
                chunk = os.pread(fd, length - len(out), vaddr + len(out))
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out
    return fd, read


@pytest.mark.skipif(struct.calcsize("P") != 8 or not Path("/proc/self/mem").exists(),
                    reason="needs a 64-bit Linux process")
def test_walking_this_process_finds_its_libraries_and_r_debug() -> None:
    fd, read = _self_reader()
    try:
        auxv = Path("/proc/self/auxv").read_bytes()
        info = dl.walk(read, auxv, 8, symbols=("_r_debug", "printf"))
    finally:
        os.close(fd)
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if line.split()[-1].startswith("/")}
    libs = {os.path.realpath(o.name) for o in info.objects if o.name.startswith("/")}
    assert libs and libs <= {os.path.realpath(m) for m in mapped}
    assert any("libc.so" in name for name in libs)
    libc = ctypes.CDLL(None)
    syms = {s.name: s.address for s in info.symbols}
    assert syms["printf"] == ctypes.cast(libc.printf, ctypes.c_void_p).value
    assert syms["_r_debug"] == info.r_debug
    assert info.sizeof_pthread > 0            # glibc's libthread_db descriptor size

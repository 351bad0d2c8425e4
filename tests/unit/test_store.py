"""The store on a real file system: frames, checksums, limits, the index across
reopenings, and the directory's permissions (no agent)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from corepeek_agent.store.frames import BLOCK, Corrupt, FrameReader
from corepeek_agent.store.limits import EntrySize, StoreLimits, to_evict
from corepeek_agent.store.safedir import StoreDirError
from corepeek_agent.store.store import EntryCorrupt, EntryNotFound, Store


def core_bytes(seed: int, size: int) -> bytes:
    """Mixed content: random, compressible and all-zero blocks, an odd tail."""
    rng = random.Random(seed)
    out = bytearray(size)
    for start in range(0, size, BLOCK // 2):
        kind = rng.randrange(3)
        n = min(BLOCK // 2, size - start)
        if kind == 0:
            out[start:start + n] = rng.randbytes(n)
        elif kind == 1:
            out[start:start + n] = (b"corepeek" * (n // 8 + 1))[:n]
    return bytes(out)


def put(store: Store, data: bytes, program: str = "/bin/app", holes_from: int = -1) -> str:
    with store.writing() as p:
        if holes_from >= 0:
            p.writer.data(data[:holes_from])
            p.writer.zeros(len(data) - holes_from)
        else:
            p.writer.data(data)
        written = p.writer.finish()
    return store.commit(p, written, b"", {"exe": program, "pid": 1}, program).id


def read_all(reader: FrameReader, offset: int, length: int) -> bytes:
    return b"".join(bytes(n) if d is None else d for _, d, n in reader.read(offset, length))


def test_any_offset_is_served_exactly(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    data = core_bytes(1, 5 * BLOCK + 12345)
    entry = store.get(put(store, data))
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.stored_bytes < len(data)                 # compressed, zero blocks left out
    reader = store.open(entry)
    rng = random.Random(2)
    for _ in range(200):
        off = rng.randrange(len(data))
        n = rng.randrange(1, 3 * BLOCK)
        assert read_all(reader, off, n) == data[off:off + n]
    assert read_all(reader, 0, len(data) + 100) == data


def test_holes_are_not_stored(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    data = core_bytes(3, BLOCK) + bytes(64 * BLOCK)
    entry = store.get(put(store, data, holes_from=BLOCK))
    assert entry.core_size == len(data) and entry.stored_bytes < BLOCK
    st = os.stat(tmp_path / "s" / f"{entry.id}.zst")
    assert st.st_size == entry.stored_bytes and st.st_mode & 0o777 == 0o600
    assert read_all(store.open(entry), 0, len(data)) == data


def test_a_corrupted_entry_is_reported_and_never_served(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    entry_id = put(store, core_bytes(4, 3 * BLOCK))
    path = tmp_path / "s" / f"{entry_id}.zst"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(EntryCorrupt, match="checksum"):
        store.open(store.get(entry_id))
    assert store.get(entry_id).corrupt                    # listed as corrupt from now on
    with pytest.raises(EntryCorrupt):
        store.open(store.get(entry_id))


def test_a_block_changed_after_opening_fails_its_read(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    data = core_bytes(5, 2 * BLOCK)
    entry = store.get(put(store, data))
    reader = store.open(entry)
    path = tmp_path / "s" / f"{entry.id}.zst"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(Corrupt):
        read_all(reader, 0, len(data))


def test_the_index_survives_reopening_and_orphans_go(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    data = core_bytes(6, BLOCK + 7)
    entry_id = put(store, data)
    store.close()
    (tmp_path / "s" / "deadbeefdeadbeef.zst").write_bytes(b"half written")
    again = Store(str(tmp_path / "s"))
    assert [e.id for e in again.entries()] == [entry_id]
    assert read_all(again.open(again.get(entry_id)), 0, len(data)) == data
    assert not (tmp_path / "s" / "deadbeefdeadbeef.zst").exists()
    with pytest.raises(EntryNotFound):
        again.get("../index")


def test_limits_evict_oldest_first(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"), StoreLimits(max_per_program=2))
    ids = [put(store, core_bytes(i, BLOCK), program="/bin/a") for i in range(4)]
    other = put(store, core_bytes(9, BLOCK), program="/bin/b")
    assert [e.id for e in store.entries()] == [ids[2], ids[3], other]
    assert not (tmp_path / "s" / f"{ids[0]}.zst").exists()


def test_to_evict_max_use_and_keep_free() -> None:
    es = [EntrySize(f"e{i}", float(i), 100, "/p") for i in range(5)]
    assert to_evict(es, StoreLimits(max_use=250), 10**9) == ["e0", "e1", "e2"]
    assert to_evict(es, StoreLimits(keep_free=1000), 850) == ["e0", "e1"]
    assert to_evict(es, StoreLimits(), 0) == []
    assert to_evict(list(reversed(es)), StoreLimits(max_per_program=1), 10**9) == [
        "e0", "e1", "e2", "e3"]


def test_the_directory_is_private_and_links_are_refused(tmp_path: Path) -> None:
    Store(str(tmp_path / "s")).close()
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "index.sqlite").stat().st_mode & 0o777 == 0o600
    (tmp_path / "link").symlink_to(tmp_path / "s")
    with pytest.raises(StoreDirError, match="symlink"):
        Store(str(tmp_path / "link"))
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(StoreDirError, match="mode 0700"):
        Store(str(tmp_path / "open"))


def test_build_ids_from_the_first_page_of_elf_files() -> None:
    import subprocess

    from corepeek_format.buildid import build_id

    def of(head: bytes) -> str:
        return build_id(lambda off, n: head[off:off + n])

    exe = Path("/usr/bin/sleep").resolve()
    text = subprocess.run(["readelf", "-n", str(exe)], capture_output=True, text=True).stdout
    want = text.split("Build ID:")[1].split()[0]
    assert len(want) == 40 and of(exe.read_bytes()[:4096]) == want
    assert of(b"\x7fELF" + bytes(60)) == "" and of(b"not elf" * 100) == ""
    assert of(exe.read_bytes()[:200]) == ""           # notes beyond the bytes given

"""Mapped files served by the agent, and `dump --with-files` bundles (issue 13).

The target's executable and library exist only in a private mount namespace
(a tmpfs mounted by `unshare -m`), and the library is deleted once loaded: a
core alone gives `??` frames on this host.  The agent lists the files with
their build-ids and serves them through /proc/PID/map_files; the bundle's
gdbinit, and eu-stack on its .build-id tree, name every frame.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corepeek import open_capture
from corepeek.errors import CaptureError
from corepeek_format.buildid import build_id
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import CFLAGS, TARGETS_DIR, Target
from harness.tools import GDB_BASE, TOOL_ENV, eu_stack

WORKERS = 3
EXE_FRAMES = {"main", "cp_control_loop", "cp_heartbeat", "cp_signals"}
LIB_FRAMES = ["priv_sleep_deep", "priv_worker"]


def corepeek(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def _file_build_id(path: Path) -> str:
    data = path.read_bytes()
    return build_id(lambda off, n: data[off:off + n])


class PrivateTarget(Target):
    """privns run from a tmpfs only its own mount namespace sees."""

    def __init__(self, build_dir: Path, mnt: Path) -> None:
        self.mnt = mnt
        script = (f'mount -t tmpfs -o size=16m,mode=0755 corepeek-priv "{mnt}" && '
                  f'cp "{build_dir}/privns" "{build_dir}/libprivlib.so" "{mnt}/" && '
                  f'exec "{mnt}/privns" {WORKERS} "{mnt}/libprivlib.so"')
        super().__init__(Path(shutil.which("unshare") or "unshare"),
                         ["-m", "--propagation", "private", "sh", "-c", script])


@pytest.fixture
def private_target(require_root: None, tmp_path: Path) -> Iterator[tuple[PrivateTarget, dict]]:
    build_dir, mnt = tmp_path / "build", tmp_path / "priv"
    build_dir.mkdir()
    mnt.mkdir()
    flags = [f for f in CFLAGS if f != "-pthread"]
    subprocess.run(["gcc", *flags, "-fPIC", "-shared", "-Wl,--build-id", "-o",
                    str(build_dir / "libprivlib.so"), str(TARGETS_DIR / "privlib.c")], check=True)
    subprocess.run(["gcc", *CFLAGS, "-Wl,--build-id", "-o", str(build_dir / "privns"),
                    str(TARGETS_DIR / "privns.c"), f"-L{build_dir}", "-lprivlib",
                    f"-Wl,-rpath,{mnt}"], check=True)
    ids = {"exe": _file_build_id(build_dir / "privns"),
           "lib": _file_build_id(build_dir / "libprivlib.so")}
    with PrivateTarget(build_dir, mnt) as t:
        shutil.rmtree(build_dir)            # the files now exist only in the namespace
        assert not (mnt / "privns").exists(), "the tmpfs leaked into this namespace"
        maps = Path(f"/proc/{t.pid}/maps").read_text()
        assert f"{mnt}/libprivlib.so (deleted)" in maps and f"{mnt}/privns" in maps
        yield t, ids


def _backtraces(text: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if m := re.match(r"^Thread \d+ \(.*?LWP (\d+)\)", line):
            current = out.setdefault(int(m.group(1)), [])
        elif current is not None and (m := re.match(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(",
                                                      line)):
            current.append(m.group(1))
    return out


def _assert_every_thread_named(bts: dict[int, list[str]], t: Target, text: str) -> None:
    assert set(bts) == set(t.tids()), text
    workers = 0
    for tid, frames in bts.items():
        if frames[:len(frames)] and any(f in frames for f in LIB_FRAMES):
            workers += 1
            i = frames.index("priv_sleep_deep")
            assert frames[i:i + 2] == LIB_FRAMES, (tid, frames, text)
        else:
            assert EXE_FRAMES & set(frames), (tid, frames, text)
    assert workers == WORKERS, text


def test_the_agent_lists_and_serves_the_mapped_files(agent, private_target) -> None:
    t, ids = private_target
    lib_path = f"{t.mnt}/libprivlib.so"
    with open_capture(agent.address, t.pid, mode="stacks") as core:
        files = {f.path: f for f in core.layout.files}
        lib, exe = files[lib_path], files[f"{t.mnt}/privns"]
        assert (lib.build_id, exe.build_id) == (ids["lib"], ids["exe"])
        assert lib.deleted and not exe.deleted and lib.elf and lib.readable
        libc = next(f for f in files.values() if "libc.so" in f.path)
        assert libc.readable and libc.build_id == _file_build_id(Path(libc.path))
        data = core.read_file(lib.id, 0, lib.size + 4096)
        assert len(data) == lib.size and build_id(lambda o, n: data[o:o + n]) == ids["lib"]
        assert core.read_file(lib.id, 100, 50) == data[100:150]
        assert core.read_file(lib.id, lib.size + 10, 10) == b""        # past the end
        assert libc.size == Path(libc.path).stat().st_size
        assert core.read_file(libc.id, 0, libc.size) == Path(libc.path).read_bytes()
        segs = {s.file for s in core.layout.segments if s.name == lib_path + " (deleted)"}
        assert segs == {lib.id}
        data_files = [f for f in files.values() if not f.elf]
        for f in data_files:                 # locale archives and the like: stacks never
            assert not f.readable
    assert_thawed_and_undisturbed(t)


@pytest.mark.parametrize("mode,file_id,expect", [
    ("notes", 1, "PERMISSION_DENIED"),         # notes sees paths and build-ids only
    ("stacks", 0, "INVALID_ARGUMENT"),
    ("stacks", 10_000, "INVALID_ARGUMENT"),   # no such id: a file not mapped has none
    ("full", 2**32 - 1, "INVALID_ARGUMENT"),
])
def test_files_outside_the_table_or_the_mode_are_refused(agent, private_target, mode, file_id,
                                                         expect) -> None:
    t, _ = private_target
    core = open_capture(agent.address, t.pid, mode=mode)
    try:
        assert core.layout.files and all(f.build_id or not f.elf for f in core.layout.files)
        with pytest.raises(CaptureError) as err:
            core.read_file(file_id, 0, 4096)
        assert expect in str(err.value)
    finally:
        core.close()
    assert_thawed_and_undisturbed(t)


def test_a_stacks_session_never_reads_a_data_file(agent, require_root, tmp_path: Path,
                                                  build) -> None:
    """A non-ELF file the target maps (a secret in a mapped file) is listed but
    served only to full sessions; a DONTDUMP-mapped file to none."""
    secret = tmp_path / "secret.dat"
    secret.write_bytes(b"TOP-SECRET" * 1000)
    code = ("import mmap,sys,time\n"
            f"f=open({str(secret)!r},'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
            "print('ready',flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for mode, readable in (("stacks", False), ("full", True)):
            with open_capture(agent.address, p.pid, mode=mode) as core:
                f = next(f for f in core.layout.files if f.path == str(secret))
                assert not f.elf and f.readable == readable and f.build_id == ""
                if readable:
                    assert core.read_file(f.id, 0, 10) == b"TOP-SECRET"
                else:
                    with pytest.raises(CaptureError, match="PERMISSION_DENIED"):
                        core.read_file(f.id, 0, 10)
    finally:
        p.kill()
        p.wait()


def test_dump_with_files_debugs_anywhere(agent, private_target, tmp_path: Path) -> None:
    t, ids = private_target
    cache = tmp_path / "cache"
    out = tmp_path / "bundle"
    res = corepeek("dump", "--agent", agent.address, str(t.pid), "--with-files", "-o", str(out),
                   env={"XDG_CACHE_HOME": str(cache)})
    assert res.returncode == 0, res.stderr
    assert_thawed_and_undisturbed(t)
    root = out / "root"
    lib, exe = root / str(t.mnt)[1:] / "libprivlib.so", root / str(t.mnt)[1:] / "privns"
    assert (_file_build_id(lib), _file_build_id(exe)) == (ids["lib"], ids["exe"])
    for p in (out, root, lib.parent, root / "tmp", out / ".build-id"):
        assert p.stat().st_mode & 0o777 == 0o700, p
    for p in (out / "core", out / "gdbinit", out / "lldbinit", lib, exe):
        assert p.stat().st_mode & 0o777 == 0o600, p
    # gdb with nothing but the bundle: every thread, every frame of interest named
    text = subprocess.run([*GDB_BASE, "-x", str(out / "gdbinit"), "-ex", "thread apply all bt"],
                          capture_output=True, text=True, env=TOOL_ENV, timeout=120).stdout
    _assert_every_thread_named(_backtraces(text), t, text)
    # the core alone (this host's files) cannot name the library's frames
    bare = subprocess.run([*GDB_BASE, "-ex", "thread apply all bt", "-ex", "quit",
                           "--core", str(out / "core")], capture_output=True, text=True,
                          env=TOOL_ENV, timeout=120).stdout
    assert "priv_sleep_deep" not in bare
    # eu-stack finds the files by build-id in the bundle's .build-id tree
    assert (out / ".build-id" / ids["lib"][:2] / ids["lib"][2:]).samefile(lib)
    eu = subprocess.run(["eu-stack", f"--core={out / 'core'}", f"--debuginfo-path={out}"],
                        capture_output=True, text=True, env=TOOL_ENV, timeout=60).stdout
    assert eu.count("priv_sleep_deep") == WORKERS, eu
    assert "cp_control_loop" in eu and "cp_heartbeat" in eu, eu
    # lldb with nothing but the bundle
    text = subprocess.run(["lldb", "--batch", "--no-lldbinit", "-s", str(out / "lldbinit"),
                           "-o", "thread backtrace all"], capture_output=True, text=True,
                          env=TOOL_ENV, timeout=120).stdout
    threads = text.split("thread #")[1:]
    assert len(threads) == len(t.tids()), text
    assert sum("libprivlib.so`priv_sleep_deep" in th and "libprivlib.so`priv_worker" in th
               for th in threads) == WORKERS, text
    assert all("privns`cp_" in th or "privns`main" in th for th in threads
               if "priv_sleep_deep" not in th), text
    # a second bundle: the files come from the cache, none crosses the wire
    res2 = corepeek("dump", "--agent", agent.address, str(t.pid), "--with-files", "-o",
                    str(tmp_path / "bundle2"), env={"XDG_CACHE_HOME": str(cache)})
    assert res2.returncode == 0 and "(0 fetched, 0 bytes;" in res2.stderr, res2.stderr
    assert (tmp_path / "bundle2" / "root" / str(t.mnt)[1:] / "libprivlib.so").read_bytes() \
        == lib.read_bytes()
    assert_thawed_and_undisturbed(t)


def test_a_bundle_is_never_written_through_a_planted_link(agent, private_target,
                                                          tmp_path: Path) -> None:
    t, _ = private_target
    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmp_path / "out"
    link.symlink_to(victim)
    res = corepeek("dump", "--agent", agent.address, str(t.pid), "--with-files", "-o",
                   str(link), env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 1 and "exists" in res.stderr and "Traceback" not in res.stderr
    assert list(victim.iterdir()) == [] and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert_thawed_and_undisturbed(t)


def test_notes_shows_paths_and_build_ids(agent, private_target) -> None:
    t, ids = private_target
    res = corepeek("notes", "--agent", agent.address, str(t.pid), "--json")
    assert res.returncode == 0, res.stderr
    files = {f["path"]: f for f in json.loads(res.stdout)["files"]}
    assert files[f"{t.mnt}/libprivlib.so"]["build_id"] == ids["lib"]
    assert files[f"{t.mnt}/libprivlib.so"]["deleted"] is True
    text = corepeek("notes", "--agent", agent.address, str(t.pid)).stdout
    assert f"{ids['exe']}  {t.mnt}/privns" in text
    assert_thawed_and_undisturbed(t)


def test_policy_mode_budget_and_audit_apply_to_file_reads(private_target, tmp_path: Path) -> None:
    """An identity allowed notes only never opens a stacks session (so never
    reads a file); file bytes count against the session's budget and in the
    audit line."""
    from harness.agents import start_agent, stop_agent
    from security_util import wait_audit, write_policy

    t, _ = private_target
    budget = 64 * 1024
    policy = write_policy(tmp_path / "policy.yaml", {"version": 1, "rules": [
        {"name": "notes-only", "clients": ["local"], "targets": {"comm": ["privns"]},
         "modes": ["notes"]},
        {"name": "stacks-small", "clients": ["local"], "targets": {"comm": ["sh"]},
         "modes": ["stacks"], "budget": budget}]})
    a = start_agent(tmp_path, "--policy", str(policy), "--audit-log", str(tmp_path / "audit"),
                    "--sessions-per-minute", "0")
    try:
        with pytest.raises(CaptureError, match="PERMISSION_DENIED"):
            open_capture(a.address, t.pid, mode="stacks")
        with open_capture(a.address, t.pid, mode="notes") as core:
            assert any(f.path.endswith("libprivlib.so") for f in core.layout.files)
            assert not any(f.readable for f in core.layout.files)
            with pytest.raises(CaptureError, match="PERMISSION_DENIED"):
                core.read_file(1, 0, 1)
        line = wait_audit(tmp_path / "audit", pid=t.pid)
        assert line["file_bytes"] == 0
        # a shell whose rule has a small budget: files count against it
        sh = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
        try:
            with open_capture(a.address, sh.pid, mode="stacks") as core:
                exe = next(f for f in core.layout.files if f.readable and f.size > budget)
                assert len(core.read_file(exe.id, 0, 4096)) == 4096
                with pytest.raises(CaptureError, match="RESOURCE_EXHAUSTED"):
                    core.read_file(exe.id, 0, exe.size)
            line = wait_audit(tmp_path / "audit", pid=sh.pid)
            assert line["code"] == "RESOURCE_EXHAUSTED"
            assert 4096 <= line["file_bytes"] <= budget and line["files_read"] == 1
        finally:
            sh.kill()
            sh.wait()
    finally:
        stop_agent(a)
    assert_thawed_and_undisturbed(t)


def test_collect_with_files_stores_each_build_id_once(agent, build, require_root,
                                                      tmp_path: Path) -> None:
    """Two targets of one program: one core each, their libraries once per run,
    and the manifest points each capture's files to them by build-id."""
    from harness.targets import Target

    exe = build("threads")
    with Target(exe) as t1, Target(exe) as t2:
        out = tmp_path / "run"
        res = corepeek("collect", "--agents", agent.address, "--comm", exe.name[:15],
                       "--only", "stacks", "--with-files", "--out", str(out),
                       "--concurrency", "2", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert res.returncode == 0, res.stderr
        assert_thawed_and_undisturbed(t1)
        assert_thawed_and_undisturbed(t2)
    doc = json.loads((out / "manifest.json").read_text())
    caps = doc["captures"]
    assert sorted(c["pid"] for c in caps) == sorted([t1.pid, t2.pid])
    stored = doc["files"]
    exe_id = _file_build_id(exe)
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6").resolve()
    assert exe_id in stored and _file_build_id(libc) in stored
    for c in caps:
        ids = {f["build_id"] for f in c["files"]}
        assert exe_id in ids and ids <= set(stored)
    for bid, where in stored.items():
        path = out / where["path"]
        assert path.name == bid and _file_build_id(path) == bid
        assert path.stat().st_size == where["size"] == where["bytes"]
        assert path.stat().st_mode & 0o777 == 0o600
    assert len(list((out / "files").iterdir())) == len(stored)      # once each
    assert (out / "files" / exe_id).read_bytes() == exe.read_bytes()

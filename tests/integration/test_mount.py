"""`corepeek mount` and `corepeek debug` (issue 13): debuggers read a live core lazily.

The target is the private-namespace one of test_mapped_files.py: its
executable and (deleted) library exist nowhere on this host's filesystem.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.tools import GDB_BASE, TOOL_ENV
from test_mapped_files import (WORKERS, _assert_every_thread_named, _backtraces,  # noqa: F401
                               private_target)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


class Mounted:
    def __init__(self, agent: str, pid: int, mnt: Path, cache: Path, *extra: str) -> None:
        self.mnt = mnt
        mnt.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corepeek", "mount", "--agent", agent, str(pid), str(mnt),
             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
        deadline = time.monotonic() + 30
        while not (mnt / "gdbinit").exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)

    def unmount(self) -> str:
        """fusermount3 -u; the mount process's stderr."""
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True)
        _, err = self.proc.communicate(timeout=20)
        return err

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            try:
                self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def mounted(agent, private_target, tmp_path: Path) -> Iterator[tuple[Mounted, object, dict]]:
    t, ids = private_target
    m = Mounted(agent.address, t.pid, tmp_path / "mnt", tmp_path / "cache", "--live")
    try:
        yield m, t, ids
    finally:
        m.close()


def _gdb(mnt: Path, *commands: str) -> str:
    args = [a for c in commands for a in ("-ex", c)]
    return subprocess.run([*GDB_BASE, "-x", str(mnt / "gdbinit"), *args], capture_output=True,
                          text=True, env=TOOL_ENV, timeout=180).stdout


def test_gdb_through_the_mount_names_every_frame_and_reads_the_heap(mounted) -> None:
    m, t, ids = mounted
    mnt = m.mnt
    core_size = (mnt / "core").stat().st_size
    assert sorted(os.listdir(mnt)) == [".build-id", "core", "gdbinit", "lldbinit", "root"]
    assert t.state() == "t" or set(t.thread_states().values()) == {"t"}   # frozen while mounted
    text = _gdb(mnt, "thread apply all bt")
    _assert_every_thread_named(_backtraces(text), t, text)
    # a chosen byte far into the 64 MiB heap buffer reads exactly
    index = 50 * 1024 * 1024 + 12345
    addr = int(t.ready["heap_addr"]) + index
    out = _gdb(mnt, f"x/1xb {addr:#x}")
    got = re.search(rf"{addr:#x}.*?:\s+0x([0-9a-f]{{2}})", out)
    assert got and int(got.group(1), 16) == (index * 151 + 7) % 251, out
    # eu-stack through the mount's .build-id tree
    eu = subprocess.run(["eu-stack", f"--core={mnt / 'core'}", f"--debuginfo-path={mnt}"],
                        capture_output=True, text=True, env=TOOL_ENV, timeout=120).stdout
    assert eu.count("priv_sleep_deep") == WORKERS, eu
    # lldb through the mount's lldbinit
    text = subprocess.run(["lldb", "--batch", "--no-lldbinit", "-s", str(mnt / "lldbinit"),
                           "-o", "thread backtrace all"], capture_output=True, text=True,
                          env=TOOL_ENV, timeout=180).stdout
    threads = text.split("thread #")[1:]
    assert len(threads) == len(t.tids()), text
    assert sum("libprivlib.so`priv_sleep_deep" in th for th in threads) == WORKERS, text
    err = m.unmount()
    assert m.proc.returncode == 0, err
    fetched = int(re.search(r"unmounted: (\d+) bytes of core", err).group(1))
    assert fetched < core_size / 4, (fetched, core_size)
    wait_thawed(t)
    assert_thawed_and_undisturbed(t)


def test_agent_killed_while_mounted_gives_eio_quickly(private_target, tmp_path: Path) -> None:
    t, _ = private_target
    a = start_agent(tmp_path, "--sessions-per-minute", "0")
    m = None
    try:
        m = Mounted(a.address, t.pid, tmp_path / "mnt", tmp_path / "cache")
        with open(m.mnt / "core", "rb") as f:
            assert f.read(4) == b"\x7fELF"
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            t0 = time.monotonic()
            f.seek(60 * 1024 * 1024)
            with pytest.raises(OSError) as err:
                f.read(4096)
            assert err.value.errno == 5 and time.monotonic() - t0 < 5     # EIO
            t1 = time.monotonic()
            f.seek(30 * 1024 * 1024)
            with pytest.raises(OSError):
                f.read(4096)
            assert time.monotonic() - t1 < 1            # later reads fail at once
        err_text = m.unmount()
        assert m.proc.returncode == 1 and "reads failed" in err_text, err_text
    finally:
        if m is not None:
            m.close()
        stop_agent(a)
    wait_thawed(t)                  # the kernel detached when the agent died
    assert_thawed_and_undisturbed(t)


def test_debug_runs_gdb_on_a_private_mount_and_unmounts(agent, private_target,
                                                        tmp_path: Path) -> None:
    t, _ = private_target
    res = subprocess.run(
        [sys.executable, "-m", "corepeek", "debug", "--agent", agent.address, str(t.pid), "--",
         "-batch", "-nx", "-ex", "thread apply all bt"], capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **TOOL_ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    _assert_every_thread_named(_backtraces(res.stdout), t, res.stdout)
    assert "corepeek-debug-" not in subprocess.run(["mount"], capture_output=True,
                                                   text=True).stdout
    wait_thawed(t)
    assert_thawed_and_undisturbed(t)


DRGN_SCRIPT = """
for t in prog.threads():
    print("THREAD", t.tid)
    print(t.stack_trace())
"""


def test_drgn_lists_every_threads_stack_through_debug(agent, private_target,
                                                      tmp_path: Path) -> None:
    t, _ = private_target
    if shutil.which("drgn") is None:
        pytest.fail("drgn is not installed (pip install 'corepeek[drgn]')")
    res = subprocess.run(
        [sys.executable, "-m", "corepeek", "debug", "--debugger", "drgn", "--agent",
         agent.address, str(t.pid), "--", "-q", "-e", DRGN_SCRIPT], capture_output=True,
        text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **TOOL_ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    threads = res.stdout.split("THREAD ")[1:]
    assert sorted(int(th.split()[0]) for th in threads) == sorted(t.tids()), res.stdout
    assert sum("priv_sleep_deep" in th and "priv_worker" in th for th in threads) == WORKERS
    assert all(re.search(r"\b(main|cp_\w+) \(", th) for th in threads
               if "priv_sleep_deep" not in th), res.stdout
    wait_thawed(t)
    assert_thawed_and_undisturbed(t)


def test_sigint_ends_the_mount_even_with_a_reader_holding_the_core(mounted) -> None:
    """A reader that keeps the core open (stalls) does not keep the target frozen:
    SIGINT unmounts and ends the capture."""
    m, t, _ = mounted
    fd = os.open(m.mnt / "core", os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 0) == b"\x7fELF"
        assert set(t.thread_states().values()) == {"t"}
        m.proc.send_signal(signal.SIGINT)
        _, err = m.proc.communicate(timeout=20)
        assert m.proc.returncode == 0 and "unmounted:" in err, err
        wait_thawed(t)
        with pytest.raises(OSError):
            os.pread(fd, 4096, 1 << 20)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass                        # ENOTCONN: the filesystem is gone
    assert not os.path.ismount(m.mnt)
    assert_thawed_and_undisturbed(t)


def test_target_exiting_while_mounted_gives_eio(agent, build, tmp_path: Path) -> None:
    from harness.targets import Target

    with Target(build("threads")) as t:
        m = Mounted(agent.address, t.pid, tmp_path / "mnt", tmp_path / "cache", "--live")
        try:
            with open(m.mnt / "core", "rb") as f:
                assert f.read(4) == b"\x7fELF"
                t.send_signal(signal.SIGKILL)   # a traced thread group dies as zombies
                deadline = time.monotonic() + 10
                while t.state() not in ("Z", "X", "") and time.monotonic() < deadline:
                    time.sleep(0.01)
                t0 = time.monotonic()
                with pytest.raises(OSError) as err:
                    f.seek(int(t.ready["heap_addr"]) % (1 << 20) + 4096 * 16)
                    f.read(1 << 20)
                    f.seek((m.mnt / "core").stat().st_size - 4096)
                    f.read(4096)
                assert err.value.errno == 5 and time.monotonic() - t0 < 5
            err_text = m.unmount()
            assert m.proc.returncode == 1 and "NOT_FOUND" in err_text, err_text
        finally:
            m.close()
    # the agent serves the next capture as before
    with Target(build("threads")) as t2:
        m2 = Mounted(agent.address, t2.pid, tmp_path / "mnt2", tmp_path / "cache")
        try:
            assert (m2.mnt / "core").open("rb").read(4) == b"\x7fELF"
            m2.unmount()
        finally:
            m2.close()
        wait_thawed(t2)
        assert_thawed_and_undisturbed(t2)


def test_the_default_mount_is_a_snapshot_and_lets_the_target_run(agent, private_target,
                                                                  tmp_path: Path) -> None:
    t, _ = private_target
    m = Mounted(agent.address, t.pid, tmp_path / "mnt", tmp_path / "cache")
    try:
        wait_thawed(t)                  # running while mounted: the clone is served
        before = t.status()["heartbeat"]
        text = _gdb(m.mnt, "thread apply all bt")
        _assert_every_thread_named(_backtraces(text), t, text)
        assert t.status()["heartbeat"] > before
        err = m.unmount()
        assert m.proc.returncode == 0, err
    finally:
        m.close()
    assert_thawed_and_undisturbed(t)

"""Build and run the C target programs of tests/targets.

Targets speak a line protocol (see tests/targets/cp_common.c): commands go to
the fd named by env CP_CTL_FD, the "ready ..." line and replies come back on
CP_OUT_FD. Replies are a word followed by key=value fields; lists are [a,b].
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence, Union

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
TARGET_NAMES = ("threads", "eintr_probe", "vfork_parent", "bigmem", "parent_watch", "dumpfilter",
                "manymaps", "heap_stack")
CFLAGS = ("-g", "-O0", "-pthread", "-fno-omit-frame-pointer", "-Wall", "-Wextra")
COMMON_SOURCE = "cp_common.c"

Value = Union[int, str, list]


class TargetError(RuntimeError):
    """A target failed to build, start, answer, or exit; the message carries its stderr."""


# ---------------------------------------------------------------- building

def build_target(name: str, tmpdir: Path, m32: bool = False) -> Path:
    """Compile tests/targets/NAME.c into tmpdir; reuses the binary while the sources are unchanged.

    The output name embeds a hash of the sources and flags, so repeated calls in one
    session (one tmpdir) compile once.
    """
    src = TARGETS_DIR / f"{name}.c"
    if not src.is_file():
        raise TargetError(f"no target source {src} (known: {', '.join(TARGET_NAMES)})")
    flags = list(CFLAGS) + (["-m32"] if m32 else [])
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in (src, TARGETS_DIR / COMMON_SOURCE):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out = Path(tmpdir) / f"{name}{'-m32' if m32 else ''}-{digest.hexdigest()[:12]}"
    if out.exists():
        return out
    partial = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = ["gcc", *flags, "-o", str(partial), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        hint = "\n(is gcc-multilib installed?)" if m32 else ""
        raise TargetError(f"building {name} failed: {' '.join(cmd)}\n{res.stderr}{hint}")
    os.replace(partial, out)
    return out


# ---------------------------------------------------------------- protocol

def parse_value(text: str) -> Value:
    """'0x1f' / '12' -> int, '[1,a]' -> [1, 'a'], anything else stays a string."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        return [parse_value(item) for item in inner.split(",")] if inner else []
    try:
        return int(text, 0)
    except ValueError:
        return text


def parse_line(line: str) -> tuple[str, dict[str, Value]]:
    """Split 'word k=v k=v' into ('word', {k: parsed v})."""
    word, *fields = line.split()
    parsed: dict[str, Value] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        parsed[key] = parse_value(value) if sep else True
    return word, parsed


class _Channel:
    """Line I/O over a pair of pipe fds, with deadlines, so a frozen peer cannot hang a test."""

    def __init__(self, read_fd: int, write_fd: int, describe) -> None:
        self.read_fd, self.write_fd, self.describe = read_fd, write_fd, describe
        self.buf = b""
        self.stale = 0  # replies still owed to requests that timed out

    def send(self, line: str) -> None:
        try:
            os.write(self.write_fd, line.encode() + b"\n")
        except BrokenPipeError:
            raise TargetError(f"cannot send {line!r}: peer closed its control pipe\n{self.describe()}")

    def read_line(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"no {what} within {timeout:.1f}s (frozen or stuck?)\n{self.describe()}")
            if select.select([self.read_fd], [], [], left)[0]:
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    raise TargetError(f"EOF while waiting for {what}: target died\n{self.describe()}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")

    def request(self, cmd: str, timeout: float) -> tuple[str, dict[str, Value]]:
        while self.stale:
            self.read_line(timeout, "late reply to an earlier timed-out command")
            self.stale -= 1
        self.send(cmd)
        self.stale += 1
        word, fields = parse_line(self.read_line(timeout, f"reply to {cmd!r}"))
        self.stale -= 1
        if word == "error":
            raise TargetError(f"target rejected {cmd!r}: {fields}")
        return word, fields

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------- /proc

def proc_status_field(path: Path, field: str) -> str | None:
    """One field of a /proc .../status file, or None if the task is gone."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def task_ids(pid: int) -> list[int]:
    """Thread ids of pid from /proc/PID/task (empty if the process is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- signals

class _Sigval(ctypes.Union):
    _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, _Sigval]


def sigqueue(pid: int, sig: int, value: int) -> None:
    """sigqueue(3): send sig with an int payload (Python's stdlib cannot)."""
    if _libc.sigqueue(pid, sig, _Sigval(sival_int=value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sigqueue({pid}, {sig}, {value}): {os.strerror(err)}")


def remove_sysv_sem(semid: int) -> None:
    """semctl(IPC_RMID); SysV semaphores outlive a SIGKILLed eintr_probe."""
    _libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(0))  # IPC_RMID == 0


# ---------------------------------------------------------------- running

class Target:
    """A running target program; use as a context manager (killed and reaped on exit).

    With watcher=path/to/parent_watch the target is forked by parent_watch, which
    records what a real parent sees (see watch_status()); pid is then the target's pid.
    """

    def __init__(self, exe: Path, args: Sequence[str] = (), *, watcher: Path | None = None,
                 ready_timeout: float = 15.0, env: dict[str, str] | None = None) -> None:
        self.exe, self.args, self.watcher = Path(exe), [str(a) for a in args], watcher
        self.ready_timeout, self.extra_env = ready_timeout, env or {}
        self.proc: subprocess.Popen | None = None  # our direct child: target or parent_watch
        self.pid = -1
        self.pidfd = -1
        self.ready: dict[str, Value] = {}
        self.watch_ready: dict[str, Value] = {}
        self._chan: _Channel | None = None
        self._watch_chan: _Channel | None = None
        self._stderr = tempfile.TemporaryFile()
        self.exit_code: int | None = None

    # -- lifecycle
    def __enter__(self) -> "Target":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Target":
        """Spawn and wait for the ready line; raises TargetError with stderr on failure."""
        ctl_r, ctl_w = os.pipe()
        out_r, out_w = os.pipe()
        self._chan = _Channel(out_r, ctl_w, self.describe)
        env = {**os.environ, **self.extra_env, "CP_CTL_FD": str(ctl_r), "CP_OUT_FD": str(out_w)}
        argv = [str(self.exe), *self.args]
        child_ends = [ctl_r, out_w]  # closed here once the child has them
        try:
            try:
                if self.watcher is None:
                    self.proc = subprocess.Popen(argv, env=env, pass_fds=(ctl_r, out_w),
                                                 stdin=subprocess.DEVNULL, stdout=self._stderr,
                                                 stderr=self._stderr)
                else:
                    wctl_r, wctl_w = os.pipe()
                    wout_r, wout_w = os.pipe()
                    child_ends += [wctl_r, wout_w]
                    self._watch_chan = _Channel(wout_r, wctl_w, self.describe)
                    self.proc = subprocess.Popen([str(self.watcher), *argv], env=env,
                                                 pass_fds=(ctl_r, out_w), stdin=wctl_r,
                                                 stdout=wout_w, stderr=self._stderr)
            finally:
                for fd in child_ends:
                    os.close(fd)
            if self._watch_chan is not None:
                self.watch_ready = self._expect_ready(self._watch_chan, "parent_watch ready line")
                self.pid = int(self.watch_ready["child_pid"])
            else:
                self.pid = self.proc.pid
            self.pidfd = os.pidfd_open(self.pid)
            self.ready = self._expect_ready(self._chan, "ready line")
        except BaseException:
            self.close()
            raise
        return self

    def _expect_ready(self, chan: _Channel, what: str) -> dict[str, Value]:
        word, fields = parse_line(chan.read_line(self.ready_timeout, what))
        if word != "ready":
            raise TargetError(f"expected {what}, got {word} {fields}\n{self.describe()}")
        return fields

    def close(self) -> None:
        """SIGKILL the target (and parent_watch), reap, remove leftovers. Idempotent."""
        try:
            if self.pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if self.watcher is not None:  # parent_watch reaps it; wait until it has exited
                    if not select.select([self.pidfd], [], [], 10)[0]:
                        raise TargetError(f"target {self.pid} survived SIGKILL\n{self.describe()}")
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if self.proc is not None:
                try:
                    self.exit_code = self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    raise TargetError(f"pid {self.proc.pid} not reapable after SIGKILL "
                                      f"(still traced by {self.tracer_pid()}?)")
        finally:
            if isinstance(self.ready.get("semid"), int):
                remove_sysv_sem(int(self.ready["semid"]))
                self.ready["semid"] = -1
            for chan in (self._chan, self._watch_chan):
                if chan is not None:
                    chan.close()
            self._chan = self._watch_chan = None
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1

    def quit(self, timeout: float = 5.0) -> int | None:
        """Ask the target to exit ("quit"); returns its exit code (None under parent_watch,
        whose status events then show wait:exited:CODE)."""
        assert self._chan is not None, "target not running"
        word, _ = self._chan.request("quit", timeout)
        if word != "bye":
            raise TargetError(f"quit answered {word!r}")
        if not select.select([self.pidfd], [], [], timeout)[0]:
            raise TargetError(f"target {self.pid} did not exit after quit\n{self.describe()}")
        if self.watcher is None:
            self.exit_code = self.proc.wait(timeout=timeout)
            return self.exit_code
        return None

    def wait_exit(self, timeout: float = 5.0) -> int | None:
        """Wait for the target to exit on its own (e.g. after SIGTERM); exit code as in quit()."""
        if not select.select([self.pidfd], [], [], timeout)[0]:
            raise TargetError(f"target {self.pid} still running after {timeout}s\n{self.describe()}")
        if self.watcher is None:
            self.exit_code = self.proc.wait(timeout=timeout)
            return self.exit_code
        return None

    # -- talking to it
    def command(self, cmd: str, timeout: float = 5.0) -> dict[str, Value]:
        """Send one command; returns the reply fields plus 'reply': the reply's first word."""
        if self._chan is None:
            raise TargetError("target not running")
        word, fields = self._chan.request(cmd, timeout)
        return {"reply": word, **fields}

    def status(self, timeout: float = 5.0) -> dict[str, Value]:
        return self.command("status", timeout)

    def watch_command(self, cmd: str, timeout: float = 5.0) -> dict[str, Value]:
        """Send a command ("status", "quit") to parent_watch; reply fields plus 'reply'."""
        if self._watch_chan is None:
            raise TargetError("target was not started with watcher=parent_watch")
        word, fields = self._watch_chan.request(cmd, timeout)
        return {"reply": word, **fields}

    def watch_status(self, timeout: float = 5.0) -> dict[str, Value]:
        """What parent_watch saw of the target (sigchld, wait_stopped, wait_continued, events)."""
        return self.watch_command("status", timeout)

    def send_signal(self, sig: int) -> None:
        """Signal the target via its pidfd (safe against pid reuse)."""
        signal.pidfd_send_signal(self.pidfd, sig)

    # -- /proc views
    def tids(self) -> list[int]:
        return task_ids(self.pid)

    def state(self) -> str:
        """State letter of the process (its leader) from /proc/PID/status, '' if gone."""
        value = proc_status_field(Path(f"/proc/{self.pid}/status"), "State")
        return value[0] if value else ""

    def thread_states(self) -> dict[int, str]:
        states = {}
        for tid in self.tids():
            value = proc_status_field(Path(f"/proc/{self.pid}/task/{tid}/status"), "State")
            if value:
                states[tid] = value[0]
        return states

    def tracer_pid(self) -> int:
        value = proc_status_field(Path(f"/proc/{self.pid}/status"), "TracerPid")
        return int(value) if value else 0

    def tracer_pids(self) -> dict[int, int]:
        out = {}
        for tid in self.tids():
            value = proc_status_field(Path(f"/proc/{self.pid}/task/{tid}/status"), "TracerPid")
            if value is not None:
                out[tid] = int(value)
        return out

    def wait_state(self, letters: str, timeout: float = 5.0) -> dict[int, str]:
        """Poll until every thread's state is one of letters (e.g. "T", "SRD"); returns the
        states or raises TargetError. Group stops and continues reach threads one by one."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.thread_states()
            if states and all(s in letters for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TargetError(f"thread states {states}, wanted all in {letters!r}")
            time.sleep(0.005)

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def describe(self) -> str:
        """Diagnostics for error messages: exit status and stderr of what we spawned."""
        code = self.proc.poll() if self.proc is not None else None
        who = f"{self.exe.name} pid={self.pid}" + (" (via parent_watch)" if self.watcher else "")
        return f"[{who} exit={code}] stderr:\n{self.stderr_text() or '(empty)'}"


# ---------------------------------------------------------------- expected memory

def threads_pattern(seed: int, length: int, offset: int = 0) -> bytes:
    """Bytes of threads.c's buffers: seed 1 = global (pattern_addr), 2 = heap (heap_addr)."""
    return bytes((i * 151 + seed) % 251 for i in range(offset, offset + length))


def bigmem_words(offset: int, length: int) -> bytes:
    """Expected bytes of a *touched* bigmem page range starting at mapping offset (8-aligned)."""
    assert offset % 8 == 0 and length % 8 == 0
    return b"".join((0xC0DE000000000000 | off).to_bytes(8, "little")
                    for off in range(offset, offset + length, 8))


def bigmem_touched_pages(ready: dict[str, Value]) -> list[int]:
    """Mapping offsets of the pages bigmem touched, from its ready fields."""
    page, stride = int(ready["page_size"]), int(ready["stride_pages"])
    pages = int(ready["touch_bytes"]) // page
    return [i * stride * page for i in range(pages)]


def churn_data_rounds(data: bytes, offset: int = 0) -> tuple[int, int]:
    """The checker rounds (mod 256) that churn.c's cp_data bytes at ``offset`` show.

    A freeze can catch the checker mid-rewrite: a prefix from round r, the rest
    from round r-1. Returns (r of the first byte, r of the last byte); raises
    AssertionError unless the bytes are exactly such a pattern (zeros, garbage
    or a torn page are not).
    """
    assert data, "no bytes"
    rounds = [(b - (offset + i) * 31) % 256 for i, b in enumerate(data)]
    first, last = rounds[0], rounds[-1]
    assert first == last or (first - last) % 256 == 1, f"rounds {first}..{last}"
    cut = next((i for i, r in enumerate(rounds) if r != first), len(rounds))
    assert all(r == last for r in rounds[cut:]), f"not one rewrite boundary: rounds {sorted(set(rounds))}"
    return first, last

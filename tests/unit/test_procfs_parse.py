"""Parsing /proc text: stat lines with awkward comm names, smaps blocks."""

from __future__ import annotations

from corepeek_agent.procfs import parse_smaps, parse_stat


def test_stat_with_spaces_and_parens_in_comm() -> None:
    fields = " ".join(str(i) for i in range(4, 53))
    st = parse_stat(f"4242 (a b) (c)) S {fields}")
    assert st.pid == 4242 and st.comm == "a b) (c)" and st.state == "S"
    assert st.ppid == 4 and st.flags == 9 and st.start_time == 22 and st.num_threads == 20


SMAPS = """\
55dfd9652000-55dfd9654000 r--p 00000000 fe:00 260131                     /usr/bin/cat
Size:                  8 kB
Anonymous:             4 kB
VmFlags: rd mr mw me
7ffd1000-7ffd3000 rw-p 00000000 00:00 0                          [stack]
Size:                  8 kB
Anonymous:             8 kB
Swap:                  4 kB
VmFlags: rd wr mr mw me gd ac
7ffe1000-7ffe2000 rw-p 00000000 00:00 0 
Size:                  4 kB
VmFlags: rd wr mr mw me ac dd
"""


def test_smaps_blocks() -> None:
    blocks = list(parse_smaps(SMAPS))
    assert [b[0].group(7) for b in blocks] == ["/usr/bin/cat", "[stack]", ""]
    assert blocks[1][1]["Swap"] == "4 kB"
    assert "dd" in blocks[2][1]["VmFlags"].split()


def test_given_a_thread_with_a_tricky_name_when_its_state_is_read_then_it_matches_stat() -> None:
    import os
    import threading
    import time

    from corepeek_agent import procfs
    from corepeek_agent.errors import ProcessGone

    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def park() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait()

    t = threading.Thread(target=park)
    t.start()
    ready.wait()
    try:
        with open(f"/proc/self/task/{tid[0]}/comm", "w") as f:
            f.write("x) S (y")                  # parsing must use the last ')'
        # Readiness: the thread is blocked in done.wait(), by the status file's word.
        deadline = time.monotonic() + 5
        while "State:\tS" not in open(f"/proc/self/task/{tid[0]}/status").read():
            assert time.monotonic() < deadline, "the parked thread never blocked"
            time.sleep(0.001)
        pid = os.getpid()
        # A blocked thread can still be woken for a moment (the GIL hand-off of a
        # loaded machine): both parsers must agree on "S" in one of a few looks.
        seen = []
        for _ in range(50):
            seen.append((procfs.thread_state(pid, tid[0]), procfs.stat(pid, tid[0]).state))
            if seen[-1] == ("S", "S"):
                break
            time.sleep(0.01)
        assert seen[-1] == ("S", "S"), seen
        assert procfs.stat(pid, tid[0]).comm == "x) S (y"
        assert procfs.thread_state(pid, threading.get_native_id()) == "R"
    finally:
        done.set()
        t.join()
    import subprocess

    import pytest
    child = subprocess.Popen(["true"])
    child.wait()                                # reaped: its pid names no task any more
    with pytest.raises(ProcessGone):
        procfs.thread_state(child.pid, child.pid)

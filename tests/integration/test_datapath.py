"""The fast data path writes exactly the core the agent streams.

One capture of a dense target through a real agent (Unix socket, and
loopback TCP): ``write_full_core`` writes the file (direct writes from the
staging buffers), then the same capture -- the
target still frozen, so the bytes cannot change -- reads the whole core again
through ``read_bytes``, a path with no disk writer at all.  The two must be
equal byte for byte, and the target must come out thawed and undisturbed.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from corepeek.diskwriter import WriteStats
from corepeek.dump import write_full_core
from corepeek.remote import open_capture
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target

MIB = 1024 * 1024
READ = 8 * MIB


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory: pytest.TempPathFactory,
              require_root: None) -> Iterator[AgentProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = start_agent(tmp_path_factory.mktemp("tcp-agent"), "--insecure",
                    "--sessions-per-minute", "0", listen=f"127.0.0.1:{port}")
    yield a
    stop_agent(a)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_the_written_core_is_the_streamed_core_byte_for_byte(
        agent: AgentProcess, tcp_agent: AgentProcess, build, tmp_path: Path,
        transport: str) -> None:
    address = agent.address if transport == "unix" else tcp_agent.address
    # GIVEN a target with 48 MiB of dense memory (and a sparse reservation)
    with Target(build("bigmem"), ["-m", "48", "-r", "64", "-s"]) as t:
        out = tmp_path / "core"
        stats = WriteStats()
        with open_capture(address, t.pid) as core:
            # WHEN the core is written to disk, then read again in the same capture
            size = write_full_core(core, out, stats=stats)
            streamed = hashlib.sha256()
            for off in range(0, size, READ):
                streamed.update(core.read_bytes(off, min(READ, size - off)))
        # THEN the file is the stream, and most of it went through the staging copy
        assert out.stat().st_size == size
        assert _file_sha(out) == streamed.hexdigest()
        if not stats.direct_fallback:
            assert stats.direct_bytes >= 40 * MIB, stats
        assert_thawed_and_undisturbed(t)

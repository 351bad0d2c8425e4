"""Reads by offset and length: any order, repeated, overlapping, past the end.

Every answer is compared with the same bytes of the full core pulled in the
same frozen session, so the comparison is against one state of the target.
"""

from __future__ import annotations

import io
import queue
import random

import grpc
from elftools.elf.elffile import ELFFile

from corepeek.remote import open_capture
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.targets import Target


def test_random_ranges_equal_the_whole_core(agent, build, require_root) -> None:
    with Target(build("threads")) as t:
        with open_capture(agent.address, t.pid) as core:
            whole = core.read_bytes(0, core.size)
            assert len(whole) == core.size
            rng = random.Random(1)
            for _ in range(60):
                off = rng.randrange(0, core.size)
                n = rng.choice([1, 7, 4096, 65536, 3 << 20, 9 << 20])
                assert core.read_bytes(off, n) == whole[off:off + n]
            assert core.read_bytes(core.size - 5, 100) == whole[-5:]          # short at the end
            assert core.read_bytes(core.size + 10, 100) == b""                # past the end
            f = core.file
            f.seek(-16, io.SEEK_END)
            assert f.read() == whole[-16:]
            elf = ELFFile(core.file)
            assert elf.header.e_type == "ET_CORE"
        assert_thawed_and_undisturbed(t)


def test_chunks_stay_under_the_default_message_limit_and_holes_are_sent(agent, build,
                                                                       require_root) -> None:
    with Target(build("bigmem"), ["-m", "8", "-r", "256", "-s"]) as t:
        with grpc.insecure_channel(agent.address) as ch:
            reqs: queue.Queue[pb.CaptureRequest | None] = queue.Queue()
            reqs.put(pb.CaptureRequest(open=pb.OpenCapture(pid=t.pid)))
            call = pb_grpc.CoreCaptureServiceStub(ch).Capture(iter(reqs.get, None), timeout=60)
            layout = next(call).layout
            reqs.put(pb.CaptureRequest(read=pb.ReadRange(offset=0, length=layout.total_size,
                                                         request_id=7)))
            sizes, holes = [], 0
            for resp in call:
                c = resp.chunk
                assert c.request_id == 7
                sizes.append(len(c.data))
                holes += c.hole_length
                if c.last:
                    break
            reqs.put(None)
            call.cancel()
        assert max(sizes) < 4 * 1024 * 1024
        assert holes >= 200 * 1024 * 1024          # 256 MiB reserved, 8 MiB touched
        wait_thawed(t, timeout=5)
        assert_thawed_and_undisturbed(t)

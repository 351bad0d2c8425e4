"""Operational surface every agent has: health checking, reflection, listing."""

from __future__ import annotations

import os

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc


def test_health_reports_serving_for_the_service(agent) -> None:
    with grpc.insecure_channel(agent.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="corepeek.v1.CoreCaptureService"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(agent) -> None:
    with grpc.insecure_channel(agent.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="corepeek.v1.CoreCaptureService")]
        answers = list(stub.ServerReflectionInfo(iter(reqs), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"corepeek.v1.CoreCaptureService", "grpc.health.v1.Health"} <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(
        answers[1].file_descriptor_response.file_descriptor_proto[0])
    methods = {m.name for s in fd.service for m in s.method}
    assert {"ListProcesses", "Capture"} <= methods


def test_list_processes_describes_this_process(agent) -> None:
    me = os.getpid()
    with grpc.insecure_channel(agent.address) as ch:
        resp = pb_grpc.CoreCaptureServiceStub(ch).ListProcesses(pb.ListProcessesRequest(pid=me),
                                                                timeout=10)
    assert len(resp.processes) == 1
    p = resp.processes[0]
    stat = open(f"/proc/{me}/stat").read().rsplit(")", 1)[1].split()
    assert (p.pid, p.ppid, p.start_time) == (me, os.getppid(), int(stat[19]))
    assert p.exe == os.readlink("/proc/self/exe") and p.threads >= 1 and p.rss_bytes > 0
    assert p.elf_class == 64 and p.cmdline and p.comm

"""Uploads straight from the agents (`collect --upload`) against a real
S3-compatible server (moto in server mode), a real agent and real targets.

Proved: the object is complete and its SHA-256 (manifest, tag) matches its
bytes, and it loads in gdb; a failed upload leaves nothing under its key and
no multipart upload behind; a destination the policy does not list is
refused; and the collector receives no core bytes — measured by a counting
proxy between the collector and the agent, side by side with a collection
that pulls the core through the collector.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from harness.relay import Relay
from harness.tools import gdb_backtraces_text

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def upload_agent(tmp: Path, s3: str, extra_rule: str = "", bucket: str = "cores") -> AgentProcess:
    policy = tmp / f"policy-{time.monotonic_ns()}.yaml"
    policy.write_text("version: 1\nrules:\n  - name: local-upload\n    clients: [local]\n"
                      f"    modes: [full]\n    uploads: [\"s3://{bucket}/ok/*\"]\n" + extra_rule)
    return start_agent(tmp, "--policy", str(policy), "--s3-endpoint-url", s3,
                       "--sessions-per-minute", "0", env=S3_ENV)


def collect(tmp: Path, agent: str, pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", "collect", "--agents", agent,
                           "--pid", str(pid), "--no-progress", *args],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, **S3_ENV}, cwd=tmp)


def test_agents_upload_complete_checksummed_cores_and_the_collector_gets_none(
        tmp_path: Path, require_root: None, build, s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, **{k.lower(): v for k, v in S3_ENV.items()
                                                       if k != "AWS_DEFAULT_REGION"},
                      region_name="us-east-1")
    s3.create_bucket(Bucket="cores")
    exe = build("growmem")
    agent = upload_agent(tmp_path, s3_server)
    proxy = Relay.unix(tmp_path / "proxy.sock", str(tmp_path / "agent.sock"))   # counts
    try:
        with Target(exe) as target:
            target.command("grow 24")
            r = collect(tmp_path, proxy.address, target.pid, "--upload", "s3://cores/ok/run1",
                        "--s3-endpoint-url", s3_server)
            assert r.returncode == 0, r.stderr
            assert_thawed_and_undisturbed(target)
            via_agent = proxy.down
            manifest = json.loads(s3.get_object(Bucket="cores", Key="ok/run1/manifest.json")[
                "Body"].read())
            (cap,) = manifest["captures"]
            assert cap["status"] == "ok" and cap["path"].startswith("s3://cores/ok/run1/")
            key = cap["path"][len("s3://cores/"):]
            body = s3.get_object(Bucket="cores", Key=key)["Body"].read()
            assert len(body) == cap["bytes"] == cap["core_bytes"] > 24 << 20
            digest = hashlib.sha256(body).hexdigest()
            tags = s3.get_object_tagging(Bucket="cores", Key=key)["TagSet"]
            assert digest == cap["sha256"] and {"Key": "sha256", "Value": digest} in tags
            core = tmp_path / "uploaded.core"
            core.write_bytes(body)
            assert "main" in gdb_backtraces_text(core, exe)

            # The same collection pulled through the collector, for comparison.
            before = proxy.down
            r = collect(tmp_path, proxy.address, target.pid, "--out", str(tmp_path / "local"))
            assert r.returncode == 0, r.stderr
            assert_thawed_and_undisturbed(target)
            pulled = proxy.down - before
        print(f"\nbytes the collector received from the agent: {via_agent} with --upload, "
              f"{pulled} without (core {len(body)} bytes)")
        assert via_agent < 256 * 1024 < len(body) // 64      # listings, layout, status only
        assert pulled > (16 << 20)                             # the touched memory came through
    finally:
        proxy.close()
        stop_agent(agent)


def test_failed_or_refused_uploads_leave_nothing_under_the_key(
        tmp_path: Path, require_root: None, build, s3_server: str) -> None:
    import boto3
    import grpc

    from corepeek.channel import open_channel
    from corepeek.v1 import capture_pb2 as pb
    from corepeek.v1 import capture_pb2_grpc as pb_grpc

    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="failing")        # moto's state is per process: a bucket of its own
    # A budget smaller than the core: the agent fails mid-upload, after parts went up.
    agent = upload_agent(tmp_path, s3_server, extra_rule="    budget: 12MiB\n", bucket="failing")
    try:
        stub = pb_grpc.CoreCaptureServiceStub(open_channel(agent.address))
        with Target(build("growmem")) as target:
            target.command("grow 32")
            for dest, code in (("s3://failing/ok/too-big.core",
                                grpc.StatusCode.RESOURCE_EXHAUSTED),
                               ("s3://failing/elsewhere/x.core",
                                grpc.StatusCode.PERMISSION_DENIED),
                               ("s3://failing/ok/../x", grpc.StatusCode.INVALID_ARGUMENT)):
                req = pb.UploadRequest(destination=dest, open=pb.OpenCapture(
                    pid=target.pid, options=pb.CaptureOptions(mode=pb.CAPTURE_MODE_FULL)))
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Upload(req, timeout=120))
                assert err.value.code() == code, err.value.details()
                assert_thawed_and_undisturbed(target)
        listed = s3.list_objects_v2(Bucket="failing").get("Contents", [])
        assert listed == []
        assert s3.list_multipart_uploads(Bucket="failing").get("Uploads", []) == []
        audit = [json.loads(line) for line in agent.log().splitlines() if '"upload"' in line]
        assert {a["upload"] for a in audit} >= {"s3://failing/ok/too-big.core",
                                                           "s3://failing/elsewhere/x.core"}
    finally:
        stop_agent(agent)

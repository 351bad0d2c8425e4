"""Upload of a stored capture (``OpenCapture.capture_id``) against a real
S3-compatible server (moto), a real agent with a store, and a real target.

Proved: the uploaded object is byte-identical to the capture that was kept;
`collect --stored --upload` does the same for a fleet's stores (full
entries only); a
destination the rule does not list is refused; a notes-mode entry is not uploaded; an identity that may read
the entry only in notes mode cannot upload it, even to a prefix its rule
lists (PERMISSION_DENIED, nothing under the key, no multipart upload left,
an audit line naming the destination).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from corepeek.channel import open_channel
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc
from harness.agents import AgentProcess, start_agent, stop_agent
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target
from test_agent_upload import S3_ENV
from test_triggers_store import add, captures, cli, wait_for


def store_agent(tmp: Path, s3: str, modes: str) -> AgentProcess:
    policy = tmp / f"policy-{time.monotonic_ns()}.yaml"
    policy.write_text("version: 1\nrules:\n  - name: local-upload\n    clients: [local]\n"
                      f"    modes: [{modes}]\n    keep: true\n    triggers: true\n"
                      "    uploads: [\"s3://stored/ok/*\"]\n")
    return start_agent(tmp, "--policy", str(policy), "--store", str(tmp / "store"),
                       "--s3-endpoint-url", s3, "--sessions-per-minute", "0", env=S3_ENV)


def upload(agent: AgentProcess, entry_id: str, dest: str) -> list[pb.UploadProgress]:
    stub = pb_grpc.CoreCaptureServiceStub(open_channel(agent.address))
    return list(stub.Upload(pb.UploadRequest(destination=dest, open=pb.OpenCapture(
        capture_id=entry_id, options=pb.CaptureOptions(mode=pb.CAPTURE_MODE_FULL))),
        timeout=120))


def test_a_stored_core_uploads_only_for_an_identity_that_may_read_it_in_full(
        tmp_path: Path, require_root: None, build, s3_server: str) -> None:  # noqa: F811
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="stored")
    agent = store_agent(tmp_path, s3_server, "full")
    try:
        with Target(build("growmem")) as target:
            target.command("grow 16")
            live = tmp_path / "live.core"
            r = cli("dump", "--agent", agent.address, str(target.pid), "--snapshot", "--keep",
                    "-o", str(live))
            assert r.returncode == 0, r.stderr
            (entry,) = captures(agent)
            add(agent, target.pid, every_seconds=1, count=1, mode=pb.CAPTURE_MODE_NOTES)
            notes = wait_for("the notes entry", lambda: [c for c in captures(agent)
                                                          if c.id != entry.id], 30, agent)
            assert_thawed_and_undisturbed(target)
        with pytest.raises(grpc.RpcError) as err:
            upload(agent, notes[0].id, "s3://stored/ok/notes.core")   # type: ignore[index]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        *_, done = upload(agent, entry.id, "s3://stored/ok/kept.core")
        body = s3.get_object(Bucket="stored", Key="ok/kept.core")["Body"].read()
        assert done.done and done.sha256 == hashlib.sha256(body).hexdigest()
        assert body == live.read_bytes()                      # the very capture kept

        # The same through `collect --stored --upload`: the collector only orchestrates.
        r = subprocess.run([sys.executable, "-m", "corepeek", "collect", "--agents",
                            agent.address, "--stored", "--pid", str(entry.pid), "--upload", "s3://stored/ok/fleet",
                            "--s3-endpoint-url", s3_server, "--no-progress"],
                           capture_output=True, text=True, timeout=180,
                           env={**os.environ, **S3_ENV}, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        manifest = json.loads(s3.get_object(Bucket="stored", Key="ok/fleet/manifest.json")[
            "Body"].read())
        (cap,) = manifest["captures"]                    # the notes entry is left out
        assert cap["status"] == "ok" and cap["sha256"] == done.sha256
        assert s3.get_object(Bucket="stored", Key=cap["path"][len("s3://stored/"):])[
            "Body"].read() == body

        with pytest.raises(grpc.RpcError) as err:
            upload(agent, entry.id, "s3://stored/elsewhere/kept.core")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            upload(agent, "0123456789abcdef", "s3://stored/ok/none.core")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    finally:
        stop_agent(agent)

    # The same store, a policy that lets this identity read only notes (its rule
    # still lists the prefix): the full core must not leave through Upload.
    agent = store_agent(tmp_path, s3_server, "notes")
    try:
        with pytest.raises(grpc.RpcError) as err:
            upload(agent, entry.id, "s3://stored/ok/abuse.core")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stored").get("Contents", [])]
        assert not [k for k in keys if "abuse" in k]
        assert s3.list_multipart_uploads(Bucket="stored").get("Uploads", []) == []
        audit = [json.loads(line) for line in agent.log().splitlines()
                 if line.startswith("{") and '"upload"' in line]
        refused = [a for a in audit if a.get("upload") == "s3://stored/ok/abuse.core"]
        assert refused and refused[-1]["outcome"] == "refused"
        assert refused[-1]["target"]["stored"] == entry.id
    finally:
        stop_agent(agent)

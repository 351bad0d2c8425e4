"""`corepeek collect` keeps every record and stores only complete captures.

Two runs into one directory keep both runs' manifests (and cores) and list
both in runs.json; a capture cut short by its target's death leaves no file;
planted symlinks are never written through; an S3 upload cut midway (a real
TCP proxy in front of a real moto server drops the connection) leaves no
object under the key and no multipart upload behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from harness.relay import Relay
from harness.targets import Target
from test_fleet import S3_ENV


def corepeek(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_into_one_directory_keep_both_records(agent, build, require_root,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "incident"
    with Target(build("threads")) as t:
        runs = []
        for _ in range(2):
            res = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                           "--only", "notes", "--out", str(out))
            assert res.returncode == 0, res.stderr
            runs.append(res)
        assert_thawed_and_undisturbed(t)
    index = json.loads((out / "runs.json").read_text())["runs"]
    assert len(index) == 2 and index[0]["manifest"] != index[1]["manifest"]
    cores = set()
    for entry, res in zip(index, runs):
        assert entry["manifest"].startswith("manifest-") and entry["summary"]["ok"] == 1
        assert f"manifest {out / entry['manifest']}" in res.stderr
        manifest = json.loads((out / entry["manifest"]).read_text())
        assert manifest["started"] == entry["started"]
        [cap] = manifest["captures"]
        assert cap["status"] == "ok" and cap["sha256"] == sha256(out / cap["path"])
        cores.add(cap["path"])
    assert len(cores) == 2, "the second run replaced the first run's core"
    latest = json.loads((out / "manifest.json").read_text())
    assert latest == json.loads((out / index[1]["manifest"]).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {*cores, *(e["manifest"] for e in index), "manifest.json", "runs.json"})


def start_collect_and_pause(address: str, pid: int, out: Path, *extra: str
                            ) -> subprocess.Popen[str]:
    """`corepeek collect` of ``pid``, SIGSTOPped once its scratch file holds 16 MiB."""
    proc = subprocess.Popen([sys.executable, "-m", "corepeek", "collect", "--agents",
                             address, "--pid", str(pid), "--out", str(out),
                             "--retries", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tmps = list(out.glob(".*.tmp")) if out.exists() else []
        sizes = []
        for tmp in tmps:
            try:
                sizes.append(tmp.stat().st_size)
            except FileNotFoundError:
                pass
        if max(sizes, default=0) > 16 << 20:
            os.kill(proc.pid, signal.SIGSTOP)
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the capture's scratch file did not grow")


def test_a_capture_cut_short_leaves_no_file(agent, build, require_root, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Target(build("bigmem"), ["-m", "768"]) as t:
        # --live: a snapshot's clone would still hold the image after the kill.
        proc = start_collect_and_pause(agent.address, t.pid, out, "--live")
        t.send_signal(signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert t.wait_exit(10) == -signal.SIGKILL
    assert proc.returncode == 1, err
    [cap] = json.loads((out / "manifest.json").read_text())["captures"]
    assert cap["status"] == "error" and cap["code"] == "NOT_FOUND" and cap["path"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [json.loads((out / "runs.json").read_text())["runs"][0]["manifest"], "manifest.json",
         "runs.json"])


def test_ctrl_c_ends_the_captures_and_keeps_the_record(agent, build, require_root,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Target(build("bigmem"), ["-m", "768"]) as t:
        proc = start_collect_and_pause(agent.address, t.pid, out)
        os.kill(proc.pid, signal.SIGINT)              # delivered when it continues
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        wait_thawed(t)
        assert_thawed_and_undisturbed(t)
    assert proc.returncode == 130 and err.endswith("corepeek: interrupted\n"), err
    assert took < 10, f"collect took {took:.1f} s to stop"
    [cap] = json.loads((out / "manifest.json").read_text())["captures"]
    assert cap["status"] == "error" and cap["path"] is None, cap
    [run] = json.loads((out / "runs.json").read_text())["runs"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [run["manifest"], "manifest.json", "runs.json"]), "a partial core was stored"


# -- S3: an upload cut midway ------------------------------------------------------------------

class CuttingProxy(Relay):
    """TCP relay to ``upstream`` that lets ``budget`` bytes of requests through in
    all, then cuts any connection that sends more than ``grace`` bytes beyond it
    (small requests -- abort, list, the manifest -- still pass)."""

    def __init__(self, upstream: tuple[str, int], budget: int, grace: int = 64 * 1024) -> None:
        self.budget, self.grace, self.cuts = budget, grace, 0
        super().__init__(socket.create_server(("127.0.0.1", 0)),
                         lambda: socket.create_connection(upstream))

    @property
    def sent(self) -> int:
        return self.up

    def passed(self, conn: dict[str, int], to_server: bool, n: int) -> bool:
        super().passed(conn, to_server, n)
        if to_server and self.up > self.budget:
            conn["over"] = conn.get("over", 0) + n
            if conn["over"] > self.grace:
                with self._lock:
                    self.cuts += 1
                return False
        return True


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)


def test_s3_upload_cut_midway_leaves_no_object(agent, build, require_root, s3_server: str,
                                               s3_env: None) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="cores")
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), budget=20 << 20)
    try:
        with Target(build("bigmem"), ["-m", "64"]) as t:
            res = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                           "--out", "s3://cores/cut", "--retries", "0",
                           "--s3-endpoint-url", f"http://127.0.0.1:{proxy.port}")
            assert_thawed_and_undisturbed(t)
    finally:
        proxy.close()
    assert res.returncode == 1, res.stderr
    assert proxy.cuts > 0 and proxy.sent > 20 << 20, "the upload was not cut"
    manifest = json.loads(s3.get_object(Bucket="cores", Key="cut/manifest.json")["Body"].read())
    [cap] = manifest["captures"]
    assert cap["status"] == "error" and "upload to s3://cores/cut/" in cap["error"], cap
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cores", Prefix="cut/")["Contents"]]
    assert [k for k in keys if k.endswith(".core")] == [], keys
    assert s3.list_multipart_uploads(Bucket="cores").get("Uploads", []) == [], \
        "the cut multipart upload was not aborted"


def test_s3_runs_keep_their_manifests_and_large_cores_arrive_whole(
        agent, build, require_root, s3_server: str, s3_env: None) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="cores")
    with Target(build("bigmem"), ["-m", "40"]) as t:       # > one 8 MiB part: multipart
        for _ in range(2):
            res = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                           "--out", "s3://cores/inc", "--s3-endpoint-url", s3_server)
            assert res.returncode == 0, res.stderr
        assert_thawed_and_undisturbed(t)
    runs = json.loads(s3.get_object(Bucket="cores", Key="inc/runs.json")["Body"].read())["runs"]
    assert len(runs) == 2 and runs[0]["manifest"] != runs[1]["manifest"]
    for r in runs:
        m = json.loads(s3.get_object(Bucket="cores", Key=f"inc/{r['manifest']}")["Body"].read())
        [cap] = m["captures"]
        body = s3.get_object(Bucket="cores", Key=cap["path"].removeprefix("s3://cores/"))
        data = body["Body"].read()
        assert len(data) == cap["bytes"] == cap["core_bytes"] > 40 << 20
        assert hashlib.sha256(data).hexdigest() == cap["sha256"]
        assert data[:4] == b"\x7fELF"

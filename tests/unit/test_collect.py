"""corepeek.collect without agents: addresses, naming, planning, limits, retries,
the manifest, sinks, progress, and Kubernetes discovery.

Kubernetes discovery runs against a stand-in ``CoreV1Api`` (there is no cluster
here) that returns real ``kubernetes.client`` models (``V1PodList`` of
``V1Pod``), so the code under test reads the same objects it reads in a cluster.
The retry test talks to a real in-process gRPC server that answers UNAVAILABLE.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from corepeek import collect as c
from corepeek.cli import build_parser, main
from corepeek.v1 import capture_pb2 as pb
from corepeek.v1 import capture_pb2_grpc as pb_grpc

WHEN = datetime(2026, 11, 26, 13, 27, 5, 250000, tzinfo=timezone.utc)


# -- addresses ----------------------------------------------------------------------------

def test_agent_lists_split_on_commas_and_whitespace_and_dedupe() -> None:
    assert c.parse_agent_list(["a:1,b:2", " c:3 ,,a:1", "unix:/run/x.sock"]) == \
        ["a:1", "b:2", "c:3", "unix:/run/x.sock"]
    text = "# fleet\n10.0.0.1:7443  # rack 1\n10.0.0.2:7443,10.0.0.3:7443\n\n[fd00::1]:7443\n"
    assert c.read_agents_file(text) == ["10.0.0.1:7443", "10.0.0.2:7443", "10.0.0.3:7443",
                                        "[fd00::1]:7443"]


def test_host_port_brackets_ipv6() -> None:
    assert c.format_host_port("10.1.2.3", 7443) == "10.1.2.3:7443"
    assert c.format_host_port("fd00::1", 7443) == "[fd00::1]:7443"
    assert c.format_host_port("agent.example", 1) == "agent.example:1"


# -- naming ---------------------------------------------------------------------------------

def test_capture_names_carry_host_comm_pid_and_utc_time() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=-5)))
    assert c.capture_name("web-1.prod", "nginx", 4242, local) == \
        "web-1.prod_nginx_4242_20261126T132705Z.core"
    assert c.capture_name("h", "x", 1, WHEN, "notes", compress=True) == \
        "h_x_1_20261126T132705Z.notes.core.zst"
    assert c.capture_name("h", "x", 1, WHEN, "stacks") == "h_x_1_20261126T132705Z.stacks.core"


@pytest.mark.parametrize("raw, safe", [
    ("nginx: worker", "nginx-worker"), ("../../etc/passwd", "etc-passwd"), ("", "unknown"),
    ("..", "unknown"), (".hidden", "hidden"), ("a/b\\c\x00d", "a-b-c-d"), ("ok_name-1.2", "ok_name-1.2"),
])
def test_name_components_are_safe(raw: str, safe: str) -> None:
    assert c.safe_component(raw) == safe


def test_name_claims_make_collisions_unique() -> None:
    claims = c.NameClaims(["manifest.json"])
    n = "h_x_1_20261126T132705Z.notes.core"
    assert claims.claim(n) == n
    assert claims.claim(n) == "h_x_1_20261126T132705Z-2.notes.core"
    assert claims.claim(n) == "h_x_1_20261126T132705Z-3.notes.core"
    assert claims.claim("manifest.json") == "manifest-2.json"


# -- planning -----------------------------------------------------------------------------

def listing(addr: str, host: str, pids: list[int], error: str = "") -> c.AgentResult:
    ep = c.Endpoint(addr)
    return c.AgentResult(endpoint=ep, host=host, error=error,
                         matches=[c.Match(addr, host, p, "x", "/x") for p in pids])


def test_plan_interleaves_hosts_and_skips_failed_agents() -> None:
    plan = c.plan_captures([listing("a", "A", [3, 1, 2]), listing("b", "B", [9]),
                            listing("d", "D", [], error="down"), listing("c", "C", [5, 6])])
    assert [(m.host, m.pid) for m in plan] == [("A", 1), ("B", 9), ("C", 5), ("A", 2),
                                               ("C", 6), ("A", 3)]


def test_matches_from_a_listing_take_the_agents_hostname() -> None:
    resp = pb.ListProcessesResponse(hostname="node-7", processes=[
        pb.ProcessInfo(pid=10, comm="api", exe="/srv/api", start_time=99, threads=4)])
    [m] = c.matches_from_listing(c.Endpoint("10.0.0.7:7443", label="node-7/pod"), resp)
    assert (m.agent, m.host, m.pid, m.start_time, m.threads) == ("10.0.0.7:7443", "node-7", 10,
                                                                  99, 4)
    [m] = c.matches_from_listing(c.Endpoint("10.0.0.7:7443", label="node-7/pod"),
                                 pb.ListProcessesResponse(processes=[pb.ProcessInfo(pid=1)]))
    assert m.host == "node-7/pod"


def test_selection_builds_the_server_side_filter() -> None:
    sel = c.Selection(comm="nginx", exe_glob="/usr/sbin/*", pid=0)
    assert sel.request() == pb.ListProcessesRequest(comm="nginx", exe_glob="/usr/sbin/*")
    assert sel.to_json() == {"comm": "nginx", "exe": "/usr/sbin/*", "pid": None}
    assert c.Selection().empty and not c.Selection(pid=3).empty


# -- limits and retries ------------------------------------------------------------------------

def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    assert c.backoff_delays(5, base=0.5, cap=3.0, rng=lambda: 0.0) == [0.25, 0.5, 1.0, 1.5, 1.5]
    top = c.backoff_delays(5, base=0.5, cap=3.0, rng=lambda: 0.999999)
    assert all(a < b for a, b in zip([0.5, 1.0, 2.0, 3.0, 3.0], [x + 1e-5 for x in top]))
    assert c.backoff_delays(0) == []


def test_run_bounded_respects_global_and_per_host_limits() -> None:
    tasks = [(host, i) for host in "ABC" for i in range(6)] + [("D", 0)]
    lock = threading.Lock()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    total = [0, 0]
    order: list[tuple[str, int]] = []

    def work(t: tuple[str, int]) -> str:
        with lock:
            order.append(t)
            running[t[0]] = running.get(t[0], 0) + 1
            peak[t[0]] = max(peak.get(t[0], 0), running[t[0]])
            total[0] += 1
            total[1] = max(total[1], total[0])
        time.sleep(0.02)
        with lock:
            running[t[0]] -= 1
            total[0] -= 1
        return f"{t[0]}{t[1]}"

    out = c.run_bounded(tasks, work, key=lambda t: t[0], concurrency=4, per_key=2)
    assert out == [f"{h}{i}" for h, i in tasks]               # results in task order
    assert max(peak.values()) == 2 and total[1] == 4
    # every host gets a turn before any host gets a third
    assert {h for h, _ in order[:4]} == {"A", "B", "C", "D"}


def test_run_bounded_turns_exceptions_into_results() -> None:
    def work(x: int) -> int:
        if x == 2:
            raise ValueError("boom")
        return x

    assert c.run_bounded([1, 2, 3], work, key=str, concurrency=2, per_key=1,
                         on_error=lambda t, e: -t) == [1, -2, 3]
    with pytest.raises(ValueError):
        c.run_bounded([1, 2, 3], work, key=str, concurrency=2, per_key=1)
    with pytest.raises(ValueError):
        c.run_bounded([1], work, key=str, concurrency=0, per_key=1)


class FlakyAgent(pb_grpc.CoreCaptureServiceServicer):
    """Answers UNAVAILABLE ``fail`` times, then lists one process."""

    def __init__(self, fail: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.fail, self.code, self.calls = fail, code, 0

    def ListProcesses(self, request, context):  # noqa: N802 - gRPC name
        self.calls += 1
        if self.calls <= self.fail:
            context.abort(self.code, "agent restarting")
        return pb.ListProcessesResponse(hostname="flaky", processes=[
            pb.ProcessInfo(pid=7, comm=request.comm or "any", exe="/bin/x")])


@pytest.fixture
def flaky(tmp_path: Path):
    servers = []

    def make(fail: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> tuple[str, FlakyAgent]:
        servicer = FlakyAgent(fail, code)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_CoreCaptureServiceServicer_to_server(servicer, server)
        sock = tmp_path / f"flaky{len(servers)}.sock"
        server.add_insecure_port(f"unix:{sock}")
        server.start()
        servers.append(server)
        return f"unix:{sock}", servicer

    yield make
    for s in servers:
        s.stop(None)


def test_listing_retries_unavailable_with_backoff(flaky, tmp_path: Path) -> None:
    addr, servicer = flaky(2)
    slept: list[float] = []
    cfg = c.CollectConfig(endpoints=[c.Endpoint(addr)], selection=c.Selection(comm="x"),
                          out=str(tmp_path / "o"), retries=3, backoff_base=0.01)
    col = c.Collector(cfg, sleep=slept.append)
    try:
        res = col.list_agent(c.Endpoint(addr))
    finally:
        col.channels.close()
    assert res.ok and res.attempts == 3 and servicer.calls == 3 and len(slept) == 2
    assert res.host == "flaky" and [m.pid for m in res.matches] == [7]


def test_listing_gives_up_after_the_retries_and_never_retries_other_codes(flaky,
                                                                          tmp_path: Path) -> None:
    addr, servicer = flaky(10)
    cfg = c.CollectConfig(endpoints=[c.Endpoint(addr)], selection=c.Selection(comm="x"),
                          out=str(tmp_path / "o"), retries=2)
    col = c.Collector(cfg, sleep=lambda s: None)
    res = col.list_agent(c.Endpoint(addr))
    assert not res.ok and res.code == "UNAVAILABLE" and res.attempts == 3 == servicer.calls
    addr2, servicer2 = flaky(10, grpc.StatusCode.PERMISSION_DENIED)
    res2 = col.list_agent(c.Endpoint(addr2))
    col.channels.close()
    assert res2.code == "PERMISSION_DENIED" and res2.attempts == 1 == servicer2.calls


def test_a_whole_run_against_a_flaky_agent_and_a_missing_one(flaky, tmp_path: Path) -> None:
    addr, _ = flaky(1)
    missing = f"unix:{tmp_path}/nothing.sock"
    cfg = c.CollectConfig(endpoints=[c.Endpoint(addr), c.Endpoint(missing),
                                     c.Endpoint("pod/x", "node-3/x", error="no IP yet")],
                          selection=c.Selection(pid=7), out=str(tmp_path / "run"), retries=1)
    result = c.Collector(cfg, sleep=lambda s: None, now=lambda: WHEN).run()
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m == result.manifest and not result.ok
    # the flaky agent listed pid 7, whose capture then failed (the stub has no Capture)
    caps = m["captures"]
    assert [x["agent"] for x in caps[:2]] == sorted([missing, "pod/x"])
    assert all(x["status"] == "error" and x["pid"] is None for x in caps[:2])
    assert caps[2]["pid"] == 7 and caps[2]["status"] == "error" and caps[2]["code"] == "UNIMPLEMENTED"
    assert m["summary"] == {"agents": 3, "agents_unreachable": 2, "captures": 3, "ok": 0,
                            "error": 3, "bytes": 0, "core_bytes": 0}
    assert [a["attempts"] for a in m["agents"]] == [2, 2, 0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "manifest-20261126T132705Z.json", "manifest.json", "runs.json"], \
        "a failed capture left a file behind"


# -- manifest -----------------------------------------------------------------------------------

def test_manifest_lists_unreachable_agents_first_and_sums_the_rest() -> None:
    agents = [listing("a:1", "A", [1]), c.AgentResult(c.Endpoint("b:1"), error="refused",
                                                      code="UNAVAILABLE", attempts=4)]
    ok = c.CaptureRecord(agent="a:1", host="A", pid=1, comm="x", exe="/x", status="ok",
                         path="A_x_1.core", bytes=100, sha256="ab", seconds=0.1234567,
                         core_bytes=400)
    bad = c.CaptureRecord(agent="a:1", host="A", pid=2, comm="x", exe="/x", status="error",
                          error="NOT_FOUND: gone", code="NOT_FOUND")
    m = c.build_manifest(started=WHEN, finished=WHEN + timedelta(seconds=2),
                         selection=c.Selection(comm="x"), mode="notes", compress=True,
                         destination="/out", agents=agents, captures=[ok, bad])
    assert m["version"] == 1 and m["started"] == "2026-11-26T13:27:05.250Z"
    assert m["seconds"] == 2.0 and m["selection"]["mode"] == "notes"
    assert m["selection"]["compress"] == "zstd"
    assert [(x["agent"], x["pid"], x["status"]) for x in m["captures"]] == [
        ("b:1", None, "error"), ("a:1", 1, "ok"), ("a:1", 2, "error")]
    assert m["summary"] == {"agents": 2, "agents_unreachable": 1, "captures": 3, "ok": 1,
                            "error": 2, "bytes": 100, "core_bytes": 400}
    required = {"agent", "host", "pid", "comm", "exe", "status", "error", "path", "bytes",
                "sha256", "seconds"}
    assert all(required <= set(x) for x in m["captures"])
    assert m["captures"][1]["seconds"] == 0.123457
    assert m["captures"][0]["code"] == "UNAVAILABLE" and m["captures"][0]["attempts"] == 4
    json.dumps(m)


def test_s3_urls() -> None:
    assert c.parse_s3_url("s3://cores/fleet/run1/") == c.S3Location("cores", "fleet/run1/")
    loc = c.parse_s3_url("s3://cores")
    assert loc.key("a.core") == "a.core" and loc.url("a.core") == "s3://cores/a.core"
    for bad in ("http://x/y", "s3://", "s3://UPPER/x", "s3://a/x"):
        with pytest.raises(ValueError):
            c.parse_s3_url(bad)


# -- sinks --------------------------------------------------------------------------------------

def sparse_file(scratch: c.Scratch, size: int = 8 << 20) -> bytes:
    os.pwrite(scratch.fd, b"ELF" * 100, 0)
    os.ftruncate(scratch.fd, size)
    return scratch.path.read_bytes()


def test_dir_sink_keeps_cores_sparse_and_hashes_them(tmp_path: Path) -> None:
    sink = c.DirSink(tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
    scratch = sink.scratch("h_x_1.core")
    assert scratch.path.name.startswith(".h_x_1.core.") and scratch.path.parent == tmp_path / "out"
    assert scratch.path.stat().st_mode & 0o777 == 0o600
    data = sparse_file(scratch)
    stored = sink.store(scratch, "h_x_1.core", compress=False)
    final = tmp_path / "out" / "h_x_1.core"
    assert stored == c.Stored("h_x_1.core", len(data), hashlib.sha256(data).hexdigest())
    assert not scratch.path.exists() and final.stat().st_blocks * 512 < 1 << 20


def test_dir_sink_never_replaces_a_file_nor_follows_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"keep")
    out = tmp_path / "out"
    sink = c.DirSink(out)
    (out / "h_x_1.core").symlink_to(secret)
    (out / "h_x_1-2.core").write_bytes(b"an earlier run's core")
    scratch = sink.scratch("h_x_1.core")
    sparse_file(scratch, 4096)
    stored = sink.store(scratch, "h_x_1.core", compress=False)
    assert stored.path == "h_x_1-3.core"
    assert secret.read_bytes() == b"keep" and (out / "h_x_1.core").is_symlink()
    assert (out / "h_x_1-2.core").read_bytes() == b"an earlier run's core"
    assert sorted(p.name for p in out.iterdir()) == ["h_x_1-2.core", "h_x_1-3.core",
                                                     "h_x_1.core"]


def test_dir_sink_compresses_with_zstd(tmp_path: Path) -> None:
    zstd = pytest.importorskip("zstandard")
    sink = c.DirSink(tmp_path)
    scratch = sink.scratch("h_x_1.core.zst")
    data = sparse_file(scratch)
    stored = sink.store(scratch, "h_x_1.core.zst", compress=True, level=3)
    blob = (tmp_path / "h_x_1.core.zst").read_bytes()
    assert stored.bytes == len(blob) < 4096 and stored.sha256 == hashlib.sha256(blob).hexdigest()
    assert zstd.ZstdDecompressor().decompress(blob) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h_x_1.core.zst"]
    path = sink.write_manifest({"version": 1}, WHEN)
    assert Path(path).name == "manifest-20261126T132705Z.json"
    assert json.loads(Path(path).read_text()) == {"version": 1}
    assert Path(path).stat().st_mode & 0o777 == 0o600


def test_dir_sink_keeps_every_runs_manifest_and_an_index(tmp_path: Path) -> None:
    sink = c.DirSink(tmp_path)
    (tmp_path / "runs.json").symlink_to("/etc/shadow")      # planted: neither read nor followed
    first = sink.write_manifest({"started": "a", "summary": {"ok": 1}}, WHEN)
    second = sink.write_manifest({"started": "b", "summary": {"ok": 2}}, WHEN)
    assert Path(first).name == "manifest-20261126T132705Z.json"
    assert Path(second).name == "manifest-20261126T132705Z-2.json"
    assert json.loads(Path(first).read_text())["started"] == "a"
    assert json.loads((tmp_path / "manifest.json").read_text())["started"] == "b"
    index = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["manifest"], r["summary"]) for r in index["runs"]] == [
        (Path(first).name, {"ok": 1}), (Path(second).name, {"ok": 2})]
    assert "root:" not in (tmp_path / "runs.json").read_text()
    assert not (tmp_path / "runs.json").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest-20261126T132705Z-2.json", "manifest-20261126T132705Z.json",
        "manifest.json", "runs.json"]


class FakeS3:
    """put/get/head only: small cores are one PutObject (s3upload)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, dict]] = {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **extra: object) -> None:
        self.objects[(Bucket, Key)] = (Body, extra)

    def _get(self, Bucket: str, Key: str) -> tuple[bytes, dict]:
        if (Bucket, Key) not in self.objects:
            err = KeyError(Key)
            err.response = {"Error": {"Code": "NoSuchKey"}}  # type: ignore[attr-defined]
            raise err
        return self.objects[(Bucket, Key)]

    def head_object(self, Bucket: str, Key: str) -> dict:
        return self._get(Bucket, Key)[1]

    def get_object(self, Bucket: str, Key: str) -> dict:
        return {"Body": io.BytesIO(self._get(Bucket, Key)[0])}


def test_s3_sink_uploads_after_writing_locally(tmp_path: Path) -> None:
    fake = FakeS3()
    sink = c.S3Sink("s3://bkt/p/q", client=fake, scratch_dir=str(tmp_path))
    scratch = sink.scratch("h_x_1.core")
    data = sparse_file(scratch, 1 << 16)
    stored = sink.store(scratch, "h_x_1.core", compress=False)
    assert stored.path == "s3://bkt/p/q/h_x_1.core" and not scratch.path.exists()
    body, extra = fake.objects[("bkt", "p/q/h_x_1.core")]
    assert body == data and extra["Metadata"]["sha256"] == stored.sha256
    assert sink.write_manifest({"a": 1}, WHEN) == \
        "s3://bkt/p/q/manifest-20261126T132705Z.json"
    assert sink.write_manifest({"a": 2}, WHEN) == \
        "s3://bkt/p/q/manifest-20261126T132705Z-2.json"
    assert json.loads(fake.objects[("bkt", "p/q/manifest.json")][0]) == {"a": 2}
    runs = json.loads(fake.objects[("bkt", "p/q/runs.json")][0])["runs"]
    assert [r["manifest"] for r in runs] == ["manifest-20261126T132705Z.json",
                                            "manifest-20261126T132705Z-2.json"]
    sink.close()
    assert not any(tmp_path.iterdir())


# -- progress ---------------------------------------------------------------------------------

def test_progress_draws_an_overall_bar_and_one_per_host() -> None:
    out = io.StringIO()
    p = c.Progress(True, file=out)
    tick = p.listing(2)
    tick(), tick()
    plan = [c.Match("10.0.0.1:7443", "web-1", 1, "x", "/x"), c.Match("10.0.0.1:7443", "web-1", 2, "x", "/x"),
            c.Match("10.0.0.2:7443", "db-1", 3, "x", "/x")]
    counts, labels = c.progress_hosts(plan)
    assert counts == {"10.0.0.1:7443": 2, "10.0.0.2:7443": 1}
    p.start(counts, labels)
    p.received("10.0.0.1:7443", 3 << 20)
    p.done("10.0.0.1:7443", True)
    p.done("10.0.0.2:7443", False)
    p.close()
    text = out.getvalue()
    assert "listing" in text and "captures" in text and "web-1" in text and "db-1" in text
    assert "ok=1 err=1" in text and "errors=1" in text and "3.0MiB" in text


def test_progress_names_agents_that_share_a_hostname_by_address() -> None:
    plan = [c.Match("unix:/a.sock", "vm", 1, "x", "/x"), c.Match("unix:/b.sock", "vm", 1, "x", "/x"),
            c.Match("10.0.0.3:7443", "db", 5, "x", "/x")]
    counts, labels = c.progress_hosts(plan)
    assert labels == {"unix:/a.sock": "vm (unix:/a.sock)", "unix:/b.sock": "vm (unix:/b.sock)",
                      "10.0.0.3:7443": "db"}
    assert counts == {"unix:/a.sock": 1, "unix:/b.sock": 1, "10.0.0.3:7443": 1}
    quiet = c.Progress(False, file=io.StringIO())
    quiet.start({"a": 1}), quiet.done("a", True), quiet.close()
    assert quiet.file.getvalue() == ""


def test_progress_falls_back_to_one_bar_for_many_hosts() -> None:
    out = io.StringIO()
    p = c.Progress(True, file=out, max_host_bars=3)
    p.start({f"h{i}": 1 for i in range(10)})
    for i in range(10):
        p.done(f"h{i}", True)
    p.close()
    assert "hosts 10/10" in out.getvalue() and "h7 " not in out.getvalue()


# -- Kubernetes -------------------------------------------------------------------------------

def pod(name: str, node: str | None, ip: str | None, phase: str = "Running",
        deleting: bool = False, port: int | None = 7443):
    k = pytest.importorskip("kubernetes.client")
    ports = [k.V1ContainerPort(name="metrics", container_port=9464)]
    if port is not None:
        ports.append(k.V1ContainerPort(name="grpc", container_port=port))
    return k.V1Pod(
        metadata=k.V1ObjectMeta(name=name, namespace="corepeek",
                                labels={"app.kubernetes.io/name": "corepeek-agent"},
                                deletion_timestamp=WHEN if deleting else None),
        spec=k.V1PodSpec(node_name=node, containers=[
            k.V1Container(name="agent", image="corepeek:0.1", ports=ports)]),
        status=k.V1PodStatus(phase=phase, pod_ip=ip))


class StandInCoreV1Api:
    """Only what discovery calls on ``kubernetes.client.CoreV1Api``, answering with real
    ``V1PodList`` models (no cluster exists here)."""

    def __init__(self, pods: list) -> None:
        self.pods = pods
        self.calls: list[tuple[str, dict]] = []

    def list_namespaced_pod(self, namespace: str, **kwargs):
        import kubernetes.client as k
        self.calls.append((namespace, kwargs))
        return k.V1PodList(items=self.pods)


def test_discovery_finds_the_daemonset_pods() -> None:
    api = StandInCoreV1Api([
        pod("agent-b", "node-2", "10.244.2.7"),
        pod("agent-a", "node-1", "10.244.1.5", port=9443),
        pod("agent-c", "node-3", None, phase="Pending"),
        pod("agent-old", "node-1", "10.244.1.4", deleting=True),
        pod("agent-done", "node-4", "10.244.4.4", phase="Failed"),
        pod("agent-v6", "node-5", "fd00::5", port=None),
    ])
    eps = c.discover_kubernetes("corepeek", "app.kubernetes.io/name=corepeek-agent", api=api)
    assert api.calls == [("corepeek", {"label_selector": "app.kubernetes.io/name=corepeek-agent"})]
    assert [(e.address, e.label, bool(e.error)) for e in eps] == [
        ("10.244.1.5:9443", "node-1/agent-a", False),
        ("10.244.2.7:7443", "node-2/agent-b", False),
        ("pod/agent-c", "node-3/agent-c", True),
        (f"[fd00::5]:{c.DEFAULT_PORT}", "node-5/agent-v6", False),
    ]
    assert "Pending" in eps[2].error
    assert [e.host for e in eps] == ["node-1", "node-2", "node-3", "node-5"]
    # the manifest names the node, not the pod's hostname (= the pod name)
    [m] = c.matches_from_listing(eps[0], pb.ListProcessesResponse(
        hostname="corepeek-agent-x7k2p", processes=[pb.ProcessInfo(pid=1)]))
    assert m.host == "node-1"
    # an explicit port wins over the pods' named port
    assert {e.address for e in c.discover_kubernetes(api=api, port=1234) if not e.error} == \
        {"10.244.1.5:1234", "10.244.2.7:1234", "[fd00::5]:1234"}


def test_discovery_reports_api_errors_in_one_line() -> None:
    class Failing:
        def list_namespaced_pod(self, namespace: str, **kwargs):
            raise RuntimeError("Forbidden: pods is forbidden")

    with pytest.raises(c.CaptureError, match="cannot list pods in namespace 'corepeek'"):
        c.discover_kubernetes(api=Failing())


def test_kubernetes_is_imported_only_when_asked() -> None:
    import subprocess
    import sys
    code = ("import sys, corepeek.cli, corepeek.collect; "
            "assert 'kubernetes' not in sys.modules and 'boto3' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('kubernetes', 'boto3'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command line ---------------------------------------------------------------------------

def test_collect_arguments() -> None:
    p = build_parser()
    a = p.parse_args(["collect", "--agents", "a:1,b:2", "--agents", "c:3", "--comm", "nginx",
                      "--only", "notes", "--compress", "--per-host", "1"])
    assert a.agents == ["a:1,b:2", "c:3"] and a.only == "notes" and a.compress
    assert (a.concurrency, a.per_host, a.retries) == (8, 1, 3)
    with pytest.raises(SystemExit):
        p.parse_args(["collect", "--agents", "a:1", "--kubernetes", "--comm", "x"])
    with pytest.raises(SystemExit):
        p.parse_args(["collect", "--comm", "x"])
    k = p.parse_args(["collect", "--kubernetes", "--exe", "/srv/*"])
    assert (k.namespace, k.selector) == (c.DEFAULT_K8S_NAMESPACE, c.DEFAULT_K8S_SELECTOR)


def test_collect_without_a_selection_is_a_usage_error(capsys) -> None:
    assert main(["collect", "--agents", "unix:/nonexistent.sock"]) == 2
    assert "--all" in capsys.readouterr().err


def test_agents_file_is_read(tmp_path: Path, capsys) -> None:
    f = tmp_path / "agents"
    f.write_text(f"unix:{tmp_path}/a.sock\n")
    out = tmp_path / "o"
    rc = main(["-q", "collect", "--agents-file", str(f), "--pid", "1", "--retries", "0",
               "--out", str(out)])
    assert rc == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["agents"][0]["agent"] == f"unix:{tmp_path}/a.sock"
    assert main(["collect", "--agents-file", str(tmp_path / "missing"), "--pid", "1"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_default_output_directory_and_times_are_utc() -> None:
    assert c.default_out_dir(WHEN) == "corepeek-collect-20261126T132705Z"
    assert c.iso_utc(WHEN.astimezone(timezone(timedelta(hours=2)))) == "2026-11-26T13:27:05.250Z"

"""Fleet collection end to end: `corepeek collect` against several real hosts.

Each host is a network namespace with its own address, its own agent (mutual
TLS, listening on the host's address, pid 1 of the host's pid namespace, with
the host's own hostname) and its own targets (harness.netns).  One host is
down (no agent), one is slow (a tbf rate limit on its link: this kernel has
no netem).  `corepeek collect` runs in the root namespace like an operator's
laptop.  Also here: zstd and S3 (a real moto server) output, and the agent's
metrics endpoint, JSON logs and plaintext health port.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from elftools.elf.elffile import ELFFile

from harness import netns
from harness.checks import assert_thawed_and_undisturbed
from harness.targets import Target, bigmem_touched_pages, bigmem_words

from security_pki import CA, KeyPair

COLLECTOR = "spiffe://corepeek.test/collector"
AGENT_PORT = 7443


def corepeek(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corepeek", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet_ok(require_root: None) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"cannot make test hosts here: {why}")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("fleet-pki"), name="fleet-ca")


@pytest.fixture(scope="module")
def client_pair(ca: CA) -> KeyPair:
    return ca.issue("collector", uris=(COLLECTOR,))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet-policy") / "policy.yaml"
    path.write_text(f"""version: 1
limits:
  sessions_per_minute: 0
rules:
  - name: collector
    clients: ["{COLLECTOR}"]
    modes: [full]
""")
    return path


def tls_args(ca: CA, pair: KeyPair) -> list[str]:
    return ["--tls-ca", str(ca.path), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]


def client_credentials(ca: CA, pair: KeyPair) -> grpc.ChannelCredentials:
    cert, key = pair.read()
    return grpc.ssl_channel_credentials(ca.path.read_bytes(), key, cert)


def start_host_agent(host: netns.Host, ca: CA, client: KeyPair, policy: Path,
                     *extra: str, before_serving: Callable[[], object] | None = None) -> str:
    server = ca.issue(f"agent-{host.hostname}-{time.monotonic_ns()}", ips=(host.ip,),
                      server=True)
    audit = host.tmp / f"audit-{host.hostname}.jsonl"
    return host.start_agent(AGENT_PORT, "--tls-cert", str(server.cert), "--tls-key",
                            str(server.key), "--tls-ca", str(ca.path), "--policy", str(policy),
                            "--audit-log", str(audit), *extra,
                            credentials=client_credentials(ca, client),
                            before_serving=before_serving)


@pytest.fixture
def fleet(fleet_ok: None, tmp_path: Path) -> Iterator[netns.Fleet]:
    f = netns.Fleet(tmp_path, 4)
    try:
        yield f
    finally:
        f.close()
        assert netns.namespaces_left() == [], "test hosts left behind"
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert not [h for h in links.splitlines()
                    if re.search(rf"\b{netns.VETH_PREFIX}{os.getpid():x}x", h)], links


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prstatus_count(path: Path) -> int:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert elf.header.e_type == "ET_CORE"
        return sum(1 for seg in elf.iter_segments() if seg.header.p_type == "PT_NOTE"
                   for note in seg.iter_notes() if note["n_type"] == "NT_PRSTATUS")


def assert_untraced(t: Target) -> None:
    """/proc says: no thread in ptrace stop, no tracer."""
    states = t.thread_states()
    assert states and "t" not in states.values(), states
    assert set(t.tracer_pids().values()) == {0}, t.tracer_pids()


# -- the fleet ----------------------------------------------------------------------------

def test_collect_gathers_notes_from_every_live_host(fleet: netns.Fleet, ca: CA,
                                                     client_pair: KeyPair, policy: Path,
                                                     build, tmp_path: Path) -> None:
    threads = build("threads")
    comm = threads.name[:15]
    fast0, fast1, slow, down = fleet.hosts
    for h in (fast0, fast1, slow):
        start_host_agent(h, ca, client_pair, policy)
    slow.shape(rate="128kbit")
    targets = {fast0.hostname: [fast0.spawn(threads), fast0.spawn(threads)],
               fast1.hostname: [fast1.spawn(threads)],
               slow.hostname: [slow.spawn(threads), slow.spawn(threads)]}
    decoy = fast1.spawn(build("eintr_probe"))          # another program: not selected
    out = tmp_path / "out"
    agents = ",".join(h.address(AGENT_PORT) for h in fleet.hosts)

    t0 = time.monotonic()
    res = corepeek("collect", "--agents", agents, "--comm", comm, "--only", "notes",
                   "--out", str(out), "--concurrency", "4", "--per-host", "1",
                   "--retries", "2", "--timeout", "10", *tls_args(ca, client_pair))
    wall = time.monotonic() - t0

    # THEN the exit status says something failed, and the manifest says what
    assert res.returncode == 1, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    caps = manifest["captures"]
    errors = [c for c in caps if c["status"] == "error"]
    assert len(errors) == 1, caps
    assert errors[0]["agent"] == down.address(AGENT_PORT) and errors[0]["pid"] is None
    assert errors[0]["code"] == "UNAVAILABLE" and errors[0]["error"]
    down_agent = next(a for a in manifest["agents"] if a["agent"] == down.address(AGENT_PORT))
    assert down_agent["status"] == "error" and down_agent["attempts"] == 3   # 1 + 2 retries
    assert f"{down.address(AGENT_PORT)}" in res.stderr

    # AND every live match was captured, on its own host, and nothing else
    ok = [c for c in caps if c["status"] == "ok"]
    expected = {(h, host.ns_pid(t.pid)) for host in (fast0, fast1, slow)
                for h, ts in [(host.hostname, targets[host.hostname])] for t in ts}
    assert {(c["host"], c["pid"]) for c in ok} == expected
    assert all(c["comm"] == comm and c["exe"] == str(threads) for c in ok)
    assert fast1.ns_pid(decoy.pid) not in {c["pid"] for c in ok if c["host"] == fast1.hostname}
    assert manifest["summary"] == {**manifest["summary"], "ok": 5, "error": 1,
                                   "agents": 4, "agents_unreachable": 1}
    by_pid = {(host.hostname, host.ns_pid(t.pid)): t for host in (fast0, fast1, slow)
              for t in targets[host.hostname]}
    for c in ok:
        path = out / c["path"]
        assert path.name == c["path"] and c["path"].startswith(f"{c['host']}_{comm}_{c['pid']}_")
        assert c["path"].endswith(".notes.core") and c["mode"] == "notes"
        assert c["bytes"] == path.stat().st_size == c["core_bytes"]
        assert c["sha256"] == sha256(path)
        assert prstatus_count(path) == len(by_pid[(c["host"], c["pid"])].tids()) == c["threads"]
        assert c["attempts"] == 1 and c["seconds"] > 0
    assert (out.stat().st_mode & 0o777) == 0o700

    # AND the slow host was slow (its link carried each core at <= 128 kbit/s) without
    # holding the others back (they were done before its last capture ended)
    def end(c: dict) -> float:
        return datetime.fromisoformat(c["time"].replace("Z", "+00:00")).timestamp() + c["seconds"]

    slow_caps = [c for c in ok if c["host"] == slow.hostname]
    fast_caps = [c for c in ok if c["host"] != slow.hostname]
    for c in slow_caps:
        assert c["seconds"] >= 0.5 * c["bytes"] / (128_000 / 8), slow_caps
    assert max(map(end, fast_caps)) < max(map(end, slow_caps)), (fast_caps, slow_caps)
    assert sorted(c["seconds"] for c in fast_caps)[len(fast_caps) // 2] < \
        min(c["seconds"] for c in slow_caps)
    assert wall < 90, wall

    # AND every target is running, untraced, and noticed nothing
    for ts in targets.values():
        for t in ts:
            assert_untraced(t)
            assert_thawed_and_undisturbed(t)
    assert_untraced(decoy)


def test_collect_retries_an_agent_that_comes_up_late(fleet: netns.Fleet, ca: CA,
                                                     client_pair: KeyPair, policy: Path,
                                                     build, tmp_path: Path) -> None:
    host = fleet.hosts[0]
    threads = build("threads")
    out = tmp_path / "late"
    # WHEN collect starts while the host's agent is still down
    proc = subprocess.Popen(
        [sys.executable, "-m", "corepeek", "-v", "collect", "--agents", host.address(AGENT_PORT),
         "--comm", threads.name[:15], "--only", "stacks", "--out", str(out),
         "--retries", "6", *tls_args(ca, client_pair)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    err_lines: list[str] = []
    retried = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            err_lines.append(line)
            if re.search(r"retry 1 in", line):
                retried.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # Readiness, not a sleep: collect has failed once and is backing off.
        assert retried.wait(60), "".join(err_lines)
        # The target exists before the agent can answer: collect's first
        # successful listing must find it (spawned after, a retry could list
        # an empty host in between).
        spawned: list[Target] = []
        start_host_agent(host, ca, client_pair, policy,
                         before_serving=lambda: spawned.append(host.spawn(threads)))
        t = spawned[0]
        proc.wait(timeout=120)
        reader.join(10)
        stderr = "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # THEN it retried with backoff until the agent answered, and captured the target
    assert proc.returncode == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["agents"][0]["attempts"] > 1, manifest["agents"]
    [c] = manifest["captures"]
    assert c["status"] == "ok" and c["pid"] == host.ns_pid(t.pid) and c["host"] == "fleet-0"
    assert c["path"].endswith(".stacks.core") and prstatus_count(out / c["path"]) == len(t.tids())
    assert_untraced(t)
    assert_thawed_and_undisturbed(t)


def test_collect_refuses_plaintext_to_remote_hosts(tmp_path: Path) -> None:
    # refused before any connection is attempted (.invalid never resolves anyway)
    res = corepeek("collect", "--agents", "agent.invalid:7443", "--comm", "x",
                   "--out", str(tmp_path / "o"), "--retries", "0")
    assert res.returncode == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    [c] = manifest["captures"]
    assert c["status"] == "error" and "--tls-ca" in c["error"], c


# -- output formats (the session's local agent) --------------------------------------------

def test_zstd_output_decompresses_to_the_core(agent, build, tmp_path: Path) -> None:
    zstd = pytest.importorskip("zstandard")
    bigmem = build("bigmem")
    with Target(bigmem, ["-m", "4", "-r", "64", "-s"]) as t:
        res = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                       "--out", str(tmp_path / "z"), "--compress")
        assert res.returncode == 0, res.stderr
        res2 = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                        "--out", str(tmp_path / "plain"))
        assert res2.returncode == 0, res2.stderr
        assert_thawed_and_undisturbed(t)
        ready = t.ready
    [c] = json.loads((tmp_path / "z" / "manifest.json").read_text())["captures"]
    [p] = json.loads((tmp_path / "plain" / "manifest.json").read_text())["captures"]
    zpath, ppath = tmp_path / "z" / c["path"], tmp_path / "plain" / p["path"]
    assert c["compressed"] and c["path"].endswith(".core.zst") and not p["compressed"]
    assert c["sha256"] == sha256(zpath) and c["bytes"] == zpath.stat().st_size
    assert c["bytes"] < c["core_bytes"] // 4           # 64 MiB mapping, 4 MiB touched
    # the uncompressed one is sparse: untouched memory is holes on disk
    st = ppath.stat()
    assert st.st_size == p["core_bytes"] > 64 << 20 and st.st_blocks * 512 < 32 << 20
    core = tmp_path / "unz.core"
    with open(zpath, "rb") as src, open(core, "wb") as dst:
        zstd.ZstdDecompressor().copy_stream(src, dst)
    assert core.stat().st_size == c["core_bytes"] == p["core_bytes"]
    # the touched pages of the big mapping are in it, byte for byte
    addr = int(ready["addr"])
    with open(core, "rb") as f:
        elf = ELFFile(f)
        seg = next(s for s in elf.iter_segments()
                   if s.header.p_type == "PT_LOAD" and s.header.p_vaddr == addr)
        for off in bigmem_touched_pages(ready)[:64]:
            f.seek(seg.header.p_offset + off)
            assert f.read(4096) == bigmem_words(off, 4096)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def test_s3_output_uploads_cores_and_manifest(agent, build, s3_server: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import shutil

    import boto3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="cores")
    # A name of this run's own: the agent sees the whole machine, where other
    # suites may run (and trace) the same threads binary.
    threads = tmp_path / f"s3thr-{os.getpid()}"
    shutil.copy2(build("threads"), threads)
    with Target(threads) as a, Target(threads) as b:
        res = corepeek("collect", "--agents", agent.address, "--comm", threads.name[:15],
                       "--only", "stacks", "--out", "s3://cores/fleet/run1",
                       "--s3-endpoint-url", s3_server, "--compress")
        assert res.returncode == 0, res.stderr
        for t in (a, b):
            assert_thawed_and_undisturbed(t)
        pids = {a.pid, b.pid}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cores", Prefix="fleet/run1/")
            .get("Contents", [])}
    manifest = json.loads(s3.get_object(Bucket="cores", Key="fleet/run1/manifest.json")
                          ["Body"].read())
    caps = [c for c in manifest["captures"] if c["pid"] in pids]
    assert len(caps) == 2 and all(c["status"] == "ok" for c in caps), manifest["captures"]
    assert manifest["destination"] == "s3://cores/fleet/run1/"
    for c in caps:
        assert c["path"].startswith("s3://cores/fleet/run1/") and c["path"].endswith(".stacks.core.zst")
        key = c["path"][len("s3://cores/"):]
        assert key in keys
        obj = s3.get_object(Bucket="cores", Key=key)
        body = obj["Body"].read()
        assert hashlib.sha256(body).hexdigest() == c["sha256"] == obj["Metadata"]["sha256"]
        assert len(body) == c["bytes"]
    # a bucket that does not exist: the capture fails (after the thaw), the run says so
    with Target(threads) as t:
        res = corepeek("collect", "--agents", agent.address, "--pid", str(t.pid),
                       "--only", "notes", "--out", "s3://no-such-bucket/x",
                       "--s3-endpoint-url", s3_server)
        assert res.returncode == 1 and "NoSuchBucket" in res.stderr, res.stderr
        assert_thawed_and_undisturbed(t)


# -- the agent's metrics, logs and health port -------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_move_with_captures(build, require_root, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from corepeek.remote import open_capture
    from harness.agents import start_agent, stop_agent

    a = start_agent(tmp_path, "--sessions-per-minute", "0", "--metrics-address",
                    "127.0.0.1:0", "--health-address", "127.0.0.1:0", "--log-format", "json")
    mport = int(a.bound["metrics"].rsplit(":", 1)[1])
    hport = int(a.bound["health"].rsplit(":", 1)[1])
    try:
        with Target(build("threads")) as t:
            before = scrape(mport)
            assert before["corepeek_sessions_active"] == 0
            with open_capture(a.address, t.pid, mode="notes") as core:
                during = scrape(mport)
                notes = core.read_bytes(core.layout.notes.offset, core.layout.notes.length)
            after = scrape(mport)
            with open_capture(a.address, t.pid, mode="stacks", snapshot=False):
                during_stacks = scrape(mport)
            assert_thawed_and_undisturbed(t)
        # while a capture is open: a notes capture has thawed its target once the
        # notes were built and given back its session slot; a stacks capture holds both
        assert during["corepeek_sessions_active"] == 0 and during["corepeek_targets_frozen"] == 0
        assert during_stacks["corepeek_sessions_active"] == 1
        assert during_stacks["corepeek_targets_frozen"] == 1
        assert after["corepeek_sessions_active"] == 0 and after["corepeek_targets_frozen"] == 0
        key = 'corepeek_captures_total{mode="notes",result="ok"}'
        assert after[key] == before[key] + 1
        assert after["corepeek_freeze_seconds_count"] == before["corepeek_freeze_seconds_count"] + 1
        assert after["corepeek_freeze_seconds_sum"] > before["corepeek_freeze_seconds_sum"]
        assert after["corepeek_stop_seconds_count"] == before["corepeek_stop_seconds_count"] + 1
        served = 'corepeek_served_bytes_total{kind="data"}'
        assert after[served] - before[served] >= len(notes)
        assert not [k for k in after if "pid" in k or "exe" in k], "per-process labels"
        # a refused capture counts as an error of its mode
        with pytest.raises(Exception):
            open_capture(a.address, 3999999, mode="full")
        key = 'corepeek_captures_total{mode="full",result="error"}'
        deadline = time.monotonic() + 5
        while (final := scrape(mport))[key] == after[key]:     # readiness, not a sleep
            assert time.monotonic() < deadline, "the refusal was never counted"
            time.sleep(0.02)
        assert final[key] == after[key] + 1
        # the plaintext health port answers kubelet-style probes
        with grpc.insecure_channel(f"127.0.0.1:{hport}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop_agent(a)
    # every line the agent logged is a JSON object (log lines and audit lines alike)
    lines = [ln for ln in a.log().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]
    assert any(d.get("level") == "info" and d.get("logger", "").startswith("corepeek_agent")
               for d in docs)
    assert any(d.get("kind") == "capture" for d in docs)

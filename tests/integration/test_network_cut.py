"""A client whose network path is cut mid-capture: the agent notices and thaws.

GIVEN an agent on its own test host (a network namespace joined to the root
namespace by a veth pair, mutual TLS on the host's address) and a client in
the root namespace with the target frozen WHEN the link is taken down (no FIN,
no RST: packets just stop) THEN the agent's keepalive notices within
keepalive + timeout and thaws the target, which stays undisturbed.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest

from corepeek.channel import TLSOptions
from corepeek.errors import CaptureError
from corepeek.remote import open_capture
from harness import netns
from harness.checks import assert_thawed_and_undisturbed, wait_thawed
from security_pki import CA

CLIENT = "spiffe://corepeek.test/netcut"
PORT = 7451
KEEPALIVE, KEEPALIVE_TIMEOUT = 1.0, 1.0


def test_cut_link_thaws_the_target_within_the_keepalive_bound(build, require_root,
                                                              tmp_path: Path) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"cannot make test hosts here: {why}")
    ca = CA(tmp_path / "pki", name="netcut-ca")
    client = ca.issue("client", uris=(CLIENT,))
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nrules:\n  - name: c\n    clients: [\"{CLIENT}\"]\n"
                      "    modes: [full]\n")
    with netns.Fleet(tmp_path, 1) as fleet:
        host = fleet.hosts[0]
        server = ca.issue("agent", ips=(host.ip,), server=True)
        cert, key = client.read()
        host.start_agent(PORT, "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                         "--tls-ca", str(ca.path), "--policy", str(policy),
                         "--keepalive", str(KEEPALIVE), "--keepalive-timeout",
                         str(KEEPALIVE_TIMEOUT),
                         credentials=grpc.ssl_channel_credentials(ca.path.read_bytes(), key, cert))
        target = host.spawn(build("threads"))
        tls = TLSOptions(ca=str(ca.path), cert=str(client.cert), key=str(client.key))
        core = open_capture(host.address(PORT), host.ns_pid(target.pid), tls=tls, snapshot=False)
        try:
            assert core.read_bytes(0, 4) == b"\x7fELF"
            assert set(target.thread_states().values()) == {"t"}

            subprocess.run(["ip", "link", "set", host.veth, "down"], check=True)
            t0 = time.monotonic()
            thawed_after = wait_thawed(target, timeout=30)
        finally:
            subprocess.run(["ip", "link", "set", host.veth, "up"], check=False)
        print(f"\nMEASURED link cut -> thawed in {thawed_after:.2f} s "
              f"(keepalive {KEEPALIVE} s + timeout {KEEPALIVE_TIMEOUT} s)")
        assert thawed_after < KEEPALIVE + KEEPALIVE_TIMEOUT + 3.0
        assert time.monotonic() - t0 < 30
        assert_thawed_and_undisturbed(target)
        with pytest.raises(CaptureError):
            core.read_bytes(0, 4096)
        core.close()

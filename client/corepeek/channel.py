"""Opening a gRPC channel to an agent from an address string.

``unix:PATH`` (or a bare absolute path) is a local socket; ``HOST:PORT`` is
TCP, which needs mutual TLS unless the host is a loopback address of an agent
started with ``--insecure``.  TLS settings come from :class:`TLSOptions` or,
when none are given, from the environment: ``COREPEEK_TLS_CA``,
``COREPEEK_TLS_CERT``, ``COREPEEK_TLS_KEY``, ``COREPEEK_TLS_SERVER_NAME``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import CaptureError

# Chunks are at most 3 MiB of payload; leave room for framing.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
]


@dataclass(frozen=True)
class TLSOptions:
    """Client side of mutual TLS: the CA the agent's certificate chains to, and
    this client's certificate and key (its SAN URI / DNS name is its identity)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None    # expected name in the agent's certificate

    @classmethod
    def from_env(cls) -> TLSOptions | None:
        env = {k: os.environ.get(f"COREPEEK_TLS_{k.upper()}") or None
               for k in ("ca", "cert", "key", "server_name")}
        return cls(**env) if any(env.values()) else None

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise CaptureError("--tls-cert and --tls-key go together")
        if not self.ca:
            raise CaptureError("--tls-ca is needed to check the agent's certificate")
        try:
            ca = Path(self.ca).read_bytes()
            cert = Path(self.cert).read_bytes() if self.cert else None
            key = Path(self.key).read_bytes() if self.key else None
        except OSError as exc:
            raise CaptureError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


def grpc_target(address: str) -> str:
    """``unix:PATH`` and ``HOST:PORT`` pass through; a bare path means a socket."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


def _is_loopback(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(address: str, tls: TLSOptions | None = None) -> grpc.Channel:
    """A channel to the agent at ``address``; TLS from ``tls`` or the environment."""
    target = grpc_target(address)
    tls = tls if tls is not None and tls.enabled else TLSOptions.from_env()
    if target.startswith("unix:"):
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    if tls is None or not tls.enabled:
        if not _is_loopback(target):
            raise CaptureError(f"{address} is a TCP address: pass --tls-ca, --tls-cert and "
                               "--tls-key (agents accept plaintext only on loopback)")
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    options: list[tuple[str, object]] = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=options)

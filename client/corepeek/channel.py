"""Opening a gRPC channel to an agent from an address string."""

from __future__ import annotations

import grpc

# Chunks are at most 3 MiB of payload; leave room for framing.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
]


def grpc_target(address: str) -> str:
    """``unix:PATH`` and ``HOST:PORT`` pass through; a bare path means a socket."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(grpc_target(address), options=CHANNEL_OPTIONS)

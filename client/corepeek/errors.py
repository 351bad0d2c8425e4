"""Client-side errors: one root, carrying the agent's gRPC status."""

from __future__ import annotations

import grpc


class CaptureError(Exception):
    """A capture failed; ``code`` is the gRPC status the agent (or channel) gave."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, what: str) -> CaptureError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        return cls(f"{what}: {name}: {details}", code)


class Interrupted(CaptureError):
    """The user interrupted the command (SIGINT, SIGTERM); exit status 130."""

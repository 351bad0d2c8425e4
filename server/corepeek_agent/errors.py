"""One exception root for the agent; each error knows its gRPC status code.

The mapping to gRPC happens in exactly one place (``service.py``) from the
``code`` attribute; ``help`` tells an operator how to fix the cause.
"""

from __future__ import annotations

import errno

import grpc


class CorepeekError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    help: str = ""

    def __init__(self, message: object = "", *, help: str | None = None) -> None:
        super().__init__(str(message))
        if help is not None:
            self.help = help

    def details(self) -> str:
        text = str(self) or type(self).__name__
        return f"{text} ({self.help})" if self.help else text


class ProcessGone(CorepeekError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidRequest(CorepeekError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class StaleTarget(CorepeekError):
    """The pid now names another process than the one the client meant."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyTraced(CorepeekError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    help = "detach the debugger or tracer (gdb, strace) from the target first"


class AgentItself(CorepeekError):
    """The target is the agent (or one of its threads): it never captures itself."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(CorepeekError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CorepeekError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SessionExpired(CorepeekError):
    """The maximum freeze duration passed; the target was thawed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    @classmethod
    def after(cls, max_freeze: float) -> SessionExpired:
        """The status text a client gets when --max-freeze ends its capture."""
        return cls(f"the agent's --max-freeze of {max_freeze:g} s ended the capture; the "
                   "target was thawed (use --snapshot, or ask for a longer --max-freeze)")


class CoreTooLargeForElf32(CorepeekError):
    """A 32-bit core stores file offsets in 32 bits; this one would not fit.

    FAILED_PRECONDITION: the target's state, not the agent's resources, makes
    the capture impossible; nothing is left frozen.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    help = ("exclude memory from the core: the target's /proc/PID/coredump_filter, "
            "or madvise(MADV_DONTDUMP) on large regions")


class PtraceUnavailable(CorepeekError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    help = ("the agent needs CAP_SYS_PTRACE (run as root or grant the capability) and "
            "ptrace must not be blocked by Yama ptrace_scope=3, seccomp or AppArmor")


class AgentLacksPrivilege(CorepeekError):
    code = grpc.StatusCode.PERMISSION_DENIED
    help = ("the agent itself was refused by the kernel: it needs CAP_SYS_PTRACE, "
            "CAP_DAC_READ_SEARCH and CAP_CHECKPOINT_RESTORE (see docs/security.md)")


def as_corepeek_error(exc: OSError) -> CorepeekError:
    """Map an OSError that escaped /proc or ptrace code to a clear status."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AgentLacksPrivilege(f"{exc.strerror}: {exc.filename or ''}".rstrip(": "))
    if exc.errno == errno.ESRCH or isinstance(exc, (FileNotFoundError, ProcessLookupError)):
        return ProcessGone(f"the target went away: {exc}")
    err = CorepeekError(f"agent error: {exc}")
    return err

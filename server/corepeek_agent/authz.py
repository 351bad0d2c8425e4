"""Authorisation: who the peer is, what the target is, and whether the policy agrees.

The Capture handler calls :meth:`Guard.begin_capture` for every stream and
hands the returned :class:`CaptureGuard` to the session as its admission
check, which runs twice: after the target is pinned by its pidfd (before any
freeze) and again once every thread is stopped (nothing can exec or change
credentials in between), so a process that turned setuid or non-dumpable
during the check is still refused.

Target facts come from the pinned pidfd where the kernel offers them
(``PIDFD_GET_INFO``, Linux 6.13+: credentials; 6.16+: dumpability) and from
/proc otherwise.  Measured on 6.18 (docs/security.md): the pidfd's coredump
mask is USER for dumpable processes and SKIP after ``PR_SET_DUMPABLE 0``, for
root and non-root targets alike; /proc/PID/status turns root-owned only for
non-root targets, so the fallback cannot tell for root targets and fails closed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field

import grpc

from . import procfs
from .audit import AuditLog, SessionRecord
from .errors import AgentItself, PermissionDenied, ProcessGone
from .exposure import Exposure
from .policy import (MODE_FULL, Policy, PolicyError, TargetFacts, deny_all_policy,
                     load_policy, local_default_policy)
from .ratelimit import ByteBudget, SessionRateLimiter

log = logging.getLogger(__name__)

# -- pidfd facts ------------------------------------------------------------------

# struct pidfd_info (include/uapi/linux/pidfd.h, PIDFD_INFO_SIZE_VER1 = 72 bytes):
# mask, cgroupid, pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid,
# exit_code, coredump_mask, spare.
_PIDFD_INFO = struct.Struct("<QQ11IiII")
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO.size << 16) | (0xFF << 8) | 11  # _IOWR(0xFF, 11, ..)
PIDFD_INFO_CREDS = 1 << 1
PIDFD_INFO_CGROUPID = 1 << 2
PIDFD_INFO_COREDUMP = 1 << 4
PIDFD_COREDUMP_USER = 1 << 2          # dumpable (SUID_DUMP_USER)
PIDFD_COREDUMP_SKIP = 1 << 1          # not dumpable (SUID_DUMP_DISABLE)
PIDFD_COREDUMP_ROOT = 1 << 3          # only root may dump (SUID_DUMP_ROOT, setuid + suid_dumpable=2)

# TEST ONLY: COREPEEK_TEST_PROC_DUMPABLE=1 in the agent's environment at start
# makes it never ask the kernel for PIDFD_INFO_COREDUMP, so the /proc fallback
# of kernels before 6.16 runs on any kernel (tests/integration/
# test_dumpable_fallback.py).  Never set it in production: it only ever makes
# the agent know less, and it says so in its log at start.
FORCE_PROC_DUMPABLE = os.environ.get("COREPEEK_TEST_PROC_DUMPABLE") == "1"


PIDFD_THREAD = os.O_EXCL            # pidfd_open flag (Linux 6.9+): a pidfd for one thread


@dataclass(frozen=True)
class PidfdInfo:
    uids: tuple[int, int, int, int] | None     # real, effective, saved, fs
    coredump_mask: int | None                  # None: kernel too old to say; 0: no mm
    tgid: int = 0


def pidfd_info(pidfd: int) -> PidfdInfo:
    """Credentials and dumpability of the process behind ``pidfd`` (race-free vs pid reuse)."""
    want = PIDFD_INFO_CREDS | (0 if FORCE_PROC_DUMPABLE else PIDFD_INFO_COREDUMP)
    buf = bytearray(_PIDFD_INFO.pack(want, *([0] * 15)))
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError as exc:
        if exc.errno == 3:          # ESRCH: the process is gone
            raise ProcessGone("the process exited") from None
        return PidfdInfo(None, None)                        # ENOTTY/EINVAL: older kernel
    f = _PIDFD_INFO.unpack(buf)
    mask = f[0]
    uids = (f[5], f[7], f[9], f[11]) if mask & PIDFD_INFO_CREDS else None
    return PidfdInfo(uids, f[14] if mask & PIDFD_INFO_COREDUMP else None, tgid=f[3])


def _coredump_mask_of_a_thread(pid: int) -> int | None:
    """The dumpability of ``pid``'s mm seen through one of its live threads.

    A thread-group leader that called pthread_exit is a zombie without an mm,
    so its own pidfd reports no coredump bits (measured); any other thread
    shares the mm.  The thread's pidfd is checked to belong to ``pid``.
    """
    for tid in sorted(procfs.task_ids(pid) - {pid}):
        try:
            fd = os.pidfd_open(tid, PIDFD_THREAD)
        except OSError:
            continue
        try:
            info = pidfd_info(fd)
        except ProcessGone:
            continue
        finally:
            os.close(fd)
        if info.tgid == pid and info.coredump_mask:
            return info.coredump_mask
    return None


_CONTAINER_ID = re.compile(r"(?:^|[/\-:])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id(cgroup: str) -> str:
    """The container id in a cgroup path (docker, containerd, cri-o, podman), or ""."""
    ids = _CONTAINER_ID.findall(cgroup)
    return ids[-1] if ids else ""


def _dumpable_from_proc(pid: int, uids: tuple[int, ...]) -> bool | None:
    """Fallback without PIDFD_INFO_COREDUMP: /proc/PID/task/TID/status turns root-owned
    when a non-root process is not dumpable (every thread: a zombie leader has no mm
    and shows its own uid); for root processes it cannot tell (None)."""
    euid = uids[1] if len(uids) > 1 else uids[0]
    if euid == 0:
        return None
    owners = set()
    for tid in procfs.task_ids(pid):
        try:
            owners.add(os.stat(f"/proc/{pid}/task/{tid}/status").st_uid)
        except FileNotFoundError:
            continue
    if not owners:
        raise ProcessGone(f"no process with pid {pid}")
    return owners == {euid}


def _exe(pid: int) -> str:
    """/proc/PID/exe, or a live thread's when the group leader is a zombie."""
    path = procfs.exe(pid)
    if path:
        return path
    for tid in sorted(procfs.task_ids(pid) - {pid}):
        try:
            return os.readlink(f"/proc/{pid}/task/{tid}/exe")
        except OSError:
            continue
    return ""


def target_facts(pid: int, pidfd: int | None = None) -> TargetFacts:
    """What the policy needs about ``pid``; raises ProcessGone if it vanished."""
    info = pidfd_info(pidfd) if pidfd is not None else PidfdInfo(None, None)
    status = procfs.status(pid)
    if info.uids is not None:
        uids: tuple[int, ...] = info.uids
    else:
        uids = tuple(int(u) for u in status.get("Uid", "").split()[:4])
    mask = info.coredump_mask
    kthread = status.get("Kthread") == "1"
    if mask == 0 and not kthread:
        mask = _coredump_mask_of_a_thread(pid) or 0           # zombie group leader
    if kthread or not uids:
        dumpable: bool | None = None
    elif mask:
        dumpable = bool(mask & PIDFD_COREDUMP_USER)
    elif mask == 0:
        dumpable = None                                       # no mm in sight: unknown
    else:
        dumpable = _dumpable_from_proc(pid, uids)
    st = procfs.stat(pid)
    cg = procfs.cgroup(pid)
    return TargetFacts(pid=pid, uids=uids, exe=_exe(pid), comm=st.comm, cgroup=cg,
                       container_id=container_id(cg), dumpable=dumpable,
                       start_time=st.start_time)


def facts_for_listing(pid: int) -> TargetFacts | None:
    """Facts through a short-lived pidfd; None for processes that vanished."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        return target_facts(pid, fd)
    except (ProcessGone, OSError, KeyError, ValueError):
        return None
    finally:
        os.close(fd)


# -- peer identity ------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Who is calling: typed identity strings (``uri:...``, ``dns:...``, local name)."""

    names: tuple[str, ...]
    transport: str          # "tls", "local" or "none"
    peer: str

    @property
    def key(self) -> str:
        """The rate-limit key: every name, so one certificate is one client."""
        return ",".join(self.names) or f"anonymous@{self.peer}"


def _values(auth: dict[str, list[bytes]], key: str) -> list[str]:
    return [v.decode(errors="replace") for v in auth.get(key, [])]


def identify(context: grpc.ServicerContext, *, local_transport: bool,
             local_identity: str) -> Identity:
    """The peer's identity from its verified certificate's SANs, never its CN.

    gRPC's ``peer_identities()`` falls back to the CN when a certificate has no
    SAN, so the typed ``peer_uri`` / ``peer_dns`` properties are read instead.
    """
    auth = context.auth_context() or {}
    peer = context.peer() or ""
    if _values(auth, "transport_security_type") == ["ssl"]:
        names = [f"uri:{u}" for u in _values(auth, "peer_uri")]
        names += [f"dns:{d}" for d in _values(auth, "peer_dns")]
        return Identity(tuple(sorted(set(names))), "tls", peer)
    if local_transport:
        return Identity((local_identity,), "local", peer)
    return Identity((), "none", peer)


# -- the guard ------------------------------------------------------------------------

@dataclass
class CaptureGuard:
    """Policy, budget and audit record of one Capture stream.

    The handler calls :meth:`admit` once the open request is known; the session
    calls the guard itself (``guard(pid, pidfd)``) as its admission check.
    """

    guard: Guard
    identity: Identity
    record: SessionRecord
    policy: Policy = field(default_factory=deny_all_policy)
    mode: str = MODE_FULL
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(None))
    facts: TargetFacts | None = None

    def admit(self, pid: int, start_time: int, mode: str) -> None:
        """Checks that need no target: the rate limit, "does a rule name this client?"
        (again: the policy may have been reloaded since the stream started), and
        "is it the agent itself?"."""
        self.record.pid, self.record.requested_start_time = pid, start_time
        self.record.mode = self.mode = mode
        self.guard.rate.acquire(self.identity.key)
        self.policy = self.guard.policy
        if not self.policy.rules_for(self.identity.names):
            raise PermissionDenied(
                f"{self.identity.key or 'a client without a SAN URI or DNS name'} is not "
                "allowed to capture anything on this agent",
                help="ask the agent's operator to add a rule for this identity to the policy")
        if pid == os.getpid() or pid in procfs.task_ids(os.getpid()):
            raise AgentItself(f"pid {pid} is the agent itself",
                              help="the agent never captures itself")

    def __call__(self, pid: int, pidfd: int) -> Exposure:
        """The session's admission check (pinned, then frozen): raises PermissionDenied,
        else returns what the admitting rule lets a stacks capture expose."""
        facts = target_facts(pid, pidfd)
        if self.facts is not None and (facts.uids, facts.exe, facts.dumpable) != (
                self.facts.uids, self.facts.exe, self.facts.dumpable):
            raise PermissionDenied(f"pid {pid} changed credentials or program while it was "
                                   "being frozen")
        first = self.facts is None
        self.facts = facts
        self.record.target = {"exe": facts.exe, "comm": facts.comm, "uids": list(facts.uids),
                              "start_time": facts.start_time, "cgroup": facts.cgroup,
                              "dumpable": facts.dumpable}
        decision = self.policy.decide(self.identity.names, facts, self.mode)
        if not decision.allowed:
            raise PermissionDenied(f"{self.identity.key or 'this client'} may not capture: "
                                   f"{decision.reason}")
        assert decision.rule is not None
        self.record.rule = decision.rule.name
        if first:
            self.budget = ByteBudget(decision.budget)
        return Exposure(decision.rule.stack_bytes, decision.rule.environment)

    def serve(self, offset: int, length: int, hole: bool) -> None:
        """Account one chunk before it is sent; data over the budget raises."""
        if not hole:
            self.budget.charge(length)
        self.record.served(offset, length, hole)

    def serve_file(self, file_id: int, length: int) -> None:
        """Account bytes of a mapped file before they are sent: the same budget."""
        self.budget.charge(length)
        self.record.file_bytes += length
        self.record.files_read.add(file_id)

    def failed(self, code: grpc.StatusCode, details: str) -> None:
        outcome = {grpc.StatusCode.PERMISSION_DENIED: "refused",
                   grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
                   grpc.StatusCode.DEADLINE_EXCEEDED: "expired",
                   grpc.StatusCode.CANCELLED: "cancelled"}.get(code, "error")
        self.record.fail(outcome, code.name, details)

    def finish(self, *, session_id: str = "", frozen_seconds: float = 0.0,
               stop_seconds: float = 0.0, expired: bool = False, active: bool = True) -> None:
        """Write the audit line (called once, from the handler's ``finally``)."""
        rec = self.record
        rec.session_id, rec.freeze_seconds = session_id, frozen_seconds
        rec.stop_micros = int(stop_seconds * 1e6)
        if expired:
            rec.fail("expired", grpc.StatusCode.DEADLINE_EXCEEDED.name,
                     "the maximum freeze duration passed; the target was thawed")
        elif not active:
            rec.fail("cancelled", grpc.StatusCode.CANCELLED.name,
                     "the RPC ended early (the client cancelled or went away, or sent a "
                     "message gRPC could not decode)")
        self.guard.audit.write(rec)


class Guard:
    """Policy, rate limits and the audit log of one agent."""

    def __init__(self, policy: Policy, *, local_transport: bool, audit: AuditLog | None = None,
                 policy_path: str | None = None, sessions_per_minute: int | None = None) -> None:
        self._policy = policy
        self.local_transport = local_transport
        self.audit = audit if audit is not None else AuditLog(None)
        self.policy_path = policy_path
        self._spm_override = sessions_per_minute
        self._lock = threading.Lock()
        per_minute = (sessions_per_minute if sessions_per_minute is not None
                      else policy.sessions_per_minute)
        self.rate = SessionRateLimiter(per_minute)
        self.list_rate = SessionRateLimiter(per_minute, what="listings")  # counted apart

    @classmethod
    def for_listener(cls, *, local_transport: bool, policy_path: str | None = None,
                     audit_path: str | None = None,
                     sessions_per_minute: int | None = None) -> Guard:
        """The agent's guard: the policy file, or the built-in default for the transport."""
        if policy_path:
            policy = load_policy(policy_path)
        elif local_transport:
            policy = local_default_policy()
            log.warning("NO POLICY: every peer that can open the local socket may capture "
                        "every dumpable process in full (pass --policy to restrict)")
        else:
            policy = deny_all_policy()
            log.warning("NO POLICY: every TLS client will be refused (PERMISSION_DENIED) "
                        "until --policy names it")
        log.info("policy %s: %d rule(s)", policy.source, len(policy.rules))
        return cls(policy, local_transport=local_transport, audit=AuditLog(audit_path),
                   policy_path=policy_path, sessions_per_minute=sessions_per_minute)

    @property
    def policy(self) -> Policy:
        with self._lock:
            return self._policy

    def reload(self) -> bool:
        """Re-read the policy file (SIGHUP); keeps the old policy if the new one is bad."""
        self.audit.reopen()
        if not self.policy_path:
            return False
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as exc:
            log.error("policy reload failed, keeping the old policy: %s", exc.details())
            rec = SessionRecord(kind="policy", identities=[], peer="")
            rec.fail("refused", "INVALID_ARGUMENT",
                     f"reload of {self.policy_path} refused, the old policy stays: {exc}")
            self.audit.write(rec)
            return False
        with self._lock:
            self._policy = policy
            if self._spm_override is None:
                self.rate.per_minute = policy.sessions_per_minute
                self.list_rate.per_minute = policy.sessions_per_minute
        log.warning("policy reloaded from %s: %d rule(s)", policy.source, len(policy.rules))
        return True

    def identify(self, context: grpc.ServicerContext) -> Identity:
        return identify(context, local_transport=self.local_transport,
                        local_identity=self.policy.local_identity)

    # -- Capture ---------------------------------------------------------------

    def begin_capture(self, context: grpc.ServicerContext) -> CaptureGuard:
        ident = self.identify(context)
        return CaptureGuard(self, ident, SessionRecord(kind="capture",
                                                       identities=list(ident.names),
                                                       peer=ident.peer))

    # -- ListProcesses -------------------------------------------------------------

    def begin_list(self, context: grpc.ServicerContext) -> ListGuard:
        ident = self.identify(context)
        return ListGuard(self, ident, self.policy,
                         SessionRecord(kind="list", identities=list(ident.names), peer=ident.peer))


@dataclass
class ListGuard:
    """ListProcesses shows only the processes the client may capture in some mode."""

    guard: Guard
    identity: Identity
    policy: Policy
    record: SessionRecord

    def check(self) -> None:
        if not self.policy.rules_for(self.identity.names):
            raise PermissionDenied(
                f"{self.identity.key or 'a client without a SAN URI or DNS name'} is not "
                "allowed to list or capture anything on this agent")
        self.guard.list_rate.acquire(self.identity.key)

    def may_see(self, pid: int) -> bool:
        facts = facts_for_listing(pid)
        return facts is not None and self.policy.may_capture(self.identity.names, facts)

    def failed(self, code: grpc.StatusCode, details: str) -> None:
        refused = code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.record.fail("refused" if refused else "error", code.name, details)

    def finish(self, listed: int) -> None:
        self.record.listed = listed
        self.guard.audit.write(self.record)


__all__ = ["Guard", "CaptureGuard", "ListGuard", "Identity", "identify", "target_facts", "pidfd_info",
           "container_id"]

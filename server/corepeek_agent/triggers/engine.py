"""The sampling thread: sample, evaluate, hand firings to the capture worker.

Triggers come from the --triggers file at start (owned by the identity each
names, default the policy's local identity) and from AddTrigger; those added
over the RPC are kept in the store directory (persist.py) after every add,
remove and firing, and restored at start under the identity that set them.  Captures
run one at a time on a worker thread, so a slow capture delays the next one,
never the sampling.  The thread's CPU time per sweep and per sampled process
is kept for the metrics and bench/.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .. import procfs
from ..errors import CorepeekError, PermissionDenied, ResourceExhausted
from . import sampler
from .capture import CaptureContext, fire
from .config import TriggerConfig
from .evaluate import Evaluator, Firing
from .persist import TriggerState
from .spec import Trigger, TriggerSpec, validate

log = logging.getLogger(__name__)

MAX_TRIGGERS_PER_OWNER = 16
MAX_TRIGGERS = 256


class TriggerEngine:
    def __init__(self, ctx: CaptureContext, interval: float,
                 config: TriggerConfig | None = None,
                 state: TriggerState | None = None) -> None:
        self.ctx = ctx
        self.state = state
        self.interval = interval
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._triggers: dict[str, Trigger] = {}
        self._evaluator = Evaluator(procfs.CLK_TCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trigger-capture")
        self.sweeps = 0
        self.sampled = 0                 # processes sampled, all sweeps
        self.sweep_cpu_seconds = 0.0     # thread CPU time of the sweeps
        for c in (config.triggers if config else ()):
            owner = c.identity or ctx.guard.policy.local_identity
            self._put(Trigger(uuid.uuid4().hex[:12], c.spec, (owner,), "config"))
        for t in (state.load() if state else ()):
            self._put(t)

    def _save(self) -> None:
        """The RPC-added triggers to disk (a failure is logged: sampling goes on)."""
        if self.state is None:
            return
        with self._save_lock:            # snapshot and write together: the newest wins
            with self._lock:
                mine = [t for t in self._triggers.values() if t.source == "rpc"]
            try:
                self.state.save(mine)
            except OSError as exc:
                log.error("triggers: cannot save the RPC-added triggers: %s", exc)

    # -- the triggers ---------------------------------------------------------------

    def _put(self, t: Trigger) -> Trigger:
        with self._lock:
            self._triggers[t.id] = t
        log.info("trigger %s (%s) by %s: %s, %s, count %d, cool-down %g s", t.id, t.source,
                 t.owner_key, t.spec.describe(), t.spec.mode, t.spec.count, t.spec.cooldown)
        return t

    def add(self, spec: TriggerSpec, owner: tuple[str, ...]) -> Trigger:
        validate(spec)
        with self._lock:
            mine = sum(1 for t in self._triggers.values() if t.owner == owner)
            if mine >= MAX_TRIGGERS_PER_OWNER or len(self._triggers) >= MAX_TRIGGERS:
                raise ResourceExhausted(f"at most {MAX_TRIGGERS_PER_OWNER} triggers per "
                                        f"identity and {MAX_TRIGGERS} in all",
                                        help="remove triggers you no longer need")
        t = self._put(Trigger(uuid.uuid4().hex[:12], spec, owner, "rpc"))
        self._save()
        return t

    def remove(self, trigger_id: str, owner: tuple[str, ...]) -> bool:
        with self._lock:
            t = self._triggers.get(trigger_id)
            if t is None:
                return False
            if t.source != "rpc" or t.owner != owner:
                raise PermissionDenied(f"trigger {trigger_id} was set by "
                                       f"{'the agent configuration' if t.source != 'rpc' else 'another identity'}; "
                                       "only its owner may remove it")
            del self._triggers[trigger_id]
        self._save()
        log.info("trigger %s removed by %s", trigger_id, ",".join(owner))
        return True

    def triggers(self) -> list[Trigger]:
        with self._lock:
            return list(self._triggers.values())

    # -- the thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trigger-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:       # the sampler must keep running
                log.exception("trigger sweep failed")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:            # fell behind: skip, never burst
                next_at, delay = time.monotonic(), 0
            self._stop.wait(delay)

    def sweep(self) -> list[Firing]:
        cpu0 = time.thread_time()
        active = [t for t in self.triggers() if not t.exhausted]
        samples = sampler.sample(active)
        with self._lock:
            firings = self._evaluator.sweep(active, samples, time.monotonic())
            for f in firings:
                f.trigger.last_fired = time.time()
        self.sweeps += 1
        self.sampled += len(samples)
        self.sweep_cpu_seconds += time.thread_time() - cpu0
        if any(f.trigger.source == "rpc" for f in firings):
            self._save()                 # the count and cool-down survive a restart
        for f in firings:
            log.warning("trigger %s fired on pid %d (%s): %s", f.trigger.id, f.sample.pid,
                        f.sample.comm, f.reason)
            self._worker.submit(self._capture, f)
        return firings

    def _capture(self, f: Firing) -> None:
        try:
            entry = fire(f, self.ctx)
        except CorepeekError as exc:
            f.trigger.last_error = exc.details()
            log.warning("trigger %s: capture of pid %d failed: %s", f.trigger.id,
                        f.sample.pid, exc.details())
        except Exception as exc:  # noqa: BLE001 - a bad firing must not stop the worker
            f.trigger.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("trigger %s: capture of pid %d failed", f.trigger.id, f.sample.pid)
        else:
            f.trigger.last_error = ""
            log.warning("trigger %s: pid %d captured into the store as %s", f.trigger.id,
                        f.sample.pid, entry)

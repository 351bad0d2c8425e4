"""The bounded runner: how many tasks at once, and when to try again (pure).

Owns the concurrency limits (:func:`run_bounded`: at most N at once, M per
host, hosts taking turns), which gRPC statuses are worth a retry, and the
backoff between retries (exponential, capped, jittered).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

# Transient failures worth another attempt: the transport (agent restarting,
# connection refused, network blip) and a pid another session is capturing.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
LIST_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

# The calling thread waits in slices of this many seconds: a signal (Ctrl-C)
# that the kernel delivers to a worker thread only runs Python's handler once
# the main thread wakes, and an untimed wait would never wake it.
_POLL = 0.2

T = TypeVar("T")
R = TypeVar("R")


def backoff_delays(retries: int, *, base: float = 0.5, cap: float = 8.0,
                   rng: Callable[[], float] = random.random) -> list[float]:
    """Delays before retry 1..``retries``: exponential from ``base``, capped at
    ``cap``, each scaled by a random factor in [0.5, 1) ("equal jitter") so
    that many collectors do not retry in step."""
    return [min(cap, base * 2 ** i) * (0.5 + rng() / 2) for i in range(max(0, retries))]


def run_bounded(tasks: Sequence[T], fn: Callable[[T], R], *, key: Callable[[T], str],
                concurrency: int, per_key: int,
                on_error: Callable[[T, BaseException], R] | None = None,
                on_abort: Callable[[], None] | None = None) -> list[R]:
    """Run ``fn`` over ``tasks`` on threads: at most ``concurrency`` at once and at
    most ``per_key`` at once for any one ``key`` (host).  A task starts as soon
    as both limits allow it; among the hosts that may start one, they take
    turns (round robin), so one big host cannot starve the others.  Results
    come back in task order; an exception becomes ``on_error(task, exc)`` (or
    is re-raised after every task finished when there is no ``on_error``).
    If the calling thread is interrupted (Ctrl-C), no further task starts,
    ``on_abort`` is called (to make the running ones end early) and the
    interruption is re-raised once they have.
    """
    if concurrency < 1 or per_key < 1:
        raise ValueError("concurrency and per-host limits must be at least 1")
    pending: OrderedDict[str, deque[int]] = OrderedDict()
    for i, task in enumerate(tasks):
        pending.setdefault(key(task), deque()).append(i)
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException] = []
    running: dict[str, int] = {k: 0 for k in pending}
    total = 0
    cond = threading.Condition()

    def work(i: int, k: str) -> None:
        nonlocal total
        try:
            results[i] = fn(tasks[i])
        except BaseException as exc:  # noqa: BLE001 - reported per task, never lost
            if on_error is None:
                errors.append(exc)
            else:
                results[i] = on_error(tasks[i], exc)
        finally:
            with cond:
                running[k] -= 1
                total -= 1
                cond.notify_all()

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="collect")
    submitted: list[futures.Future[None]] = []
    try:
        remaining = len(tasks)
        while remaining:
            with cond:
                while True:
                    ready = [k for k, q in pending.items() if q and running[k] < per_key]
                    if ready and total < concurrency:
                        break
                    cond.wait(_POLL)
                k = ready[0]
                i = pending[k].popleft()
                pending.move_to_end(k)           # round robin among the hosts
                running[k] += 1
                total += 1
            submitted.append(pool.submit(work, i, k))
            remaining -= 1
        while futures.wait(submitted, timeout=_POLL).not_done:
            pass
        pool.shutdown(wait=True)
    except BaseException:
        if on_abort is not None:
            on_abort()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    if errors:
        raise errors[0]
    return results

"""Triggers added over the RPC, kept across agent restarts.

One 0600 JSON file in the store directory (``triggers.json``), replaced
atomically (a new file, fsync, rename, fsync of the directory), so a crash
leaves the old list or the new one, never half of either.  Each trigger
keeps its id, spec, owner (the identity names that set it), how often it
fired and when (Unix time), so a count limit and a cool-down hold across a
restart.  At start every spec is validated again; an entry that does not
validate, or a file that does not parse, is logged and dropped: the agent
never fires a trigger it cannot check.  The policy is re-checked at each
firing, as for every trigger.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from ..store import safedir
from .spec import Selector, Trigger, TriggerError, TriggerSpec, validate

log = logging.getLogger(__name__)

FILE_NAME = "triggers.json"
VERSION = 1


def to_record(t: Trigger) -> dict[str, Any]:
    return {"id": t.id, "owner": list(t.owner), "fired": t.fired, "last_fired": t.last_fired,
            "spec": asdict(t.spec)}


def from_record(r: dict[str, Any], now_wall: float, now_mono: float) -> Trigger:
    """A trigger from its record (raises TriggerError, KeyError, TypeError, ValueError)."""
    spec_d = dict(r["spec"])
    sel = {k: (tuple(str(x) for x in v) if isinstance(v, list) else v)
           for k, v in dict(spec_d.pop("selector")).items()}
    spec = validate(TriggerSpec(selector=Selector(**sel), **spec_d))
    owner = tuple(str(n) for n in r["owner"])
    tid = str(r["id"])
    if not owner or not tid.isalnum() or len(tid) > 64:
        raise TriggerError("a stored trigger needs an id and an owner")
    fired, last = int(r["fired"]), float(r["last_fired"])
    t = Trigger(tid, spec, owner, "rpc", fired=fired, last_fired=last)
    if fired and last:          # the cool-down counts from the last firing, across restarts
        t.last_fired_mono = now_mono - max(0.0, now_wall - last)
    else:
        t.last_fired_mono = -math.inf
    return t


class TriggerState:
    """Reads and replaces ``triggers.json`` in the store directory ``dir_fd``."""

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self._lock = threading.Lock()

    def load(self) -> list[Trigger]:
        for name in os.listdir(self.dir_fd):           # a crash between create and rename
            if name.startswith(f".{FILE_NAME}."):
                safedir.remove_file(self.dir_fd, name)
        try:
            fd = safedir.open_file(self.dir_fd, FILE_NAME)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("triggers: cannot open %s (%s); no stored triggers restored",
                      FILE_NAME, exc.strerror)
            return []
        with os.fdopen(fd, "rb") as f:
            raw = f.read(16 << 20)
        try:
            doc = json.loads(raw)
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            records = list(doc["triggers"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("triggers: %s does not parse (%s); no stored triggers restored",
                      FILE_NAME, exc)
            return []
        out, now_wall, now_mono = [], time.time(), time.monotonic()
        for r in records:
            try:
                out.append(from_record(r, now_wall, now_mono))
            except (TriggerError, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("triggers: dropping a stored trigger that does not validate: %s", exc)
        return out

    def save(self, triggers: list[Trigger]) -> None:
        """Replace the file with ``triggers`` (those added over the RPC)."""
        data = json.dumps({"version": VERSION, "triggers": [to_record(t) for t in triggers]},
                          indent=1).encode()
        tmp = f".{FILE_NAME}.{uuid.uuid4().hex[:8]}"
        with self._lock:
            fd = safedir.create_file(self.dir_fd, tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, FILE_NAME, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            except BaseException:
                safedir.remove_file(self.dir_fd, tmp)
                raise
            os.fsync(self.dir_fd)

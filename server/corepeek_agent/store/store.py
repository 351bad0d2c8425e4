"""The store: entries written once (frames + an index row), read by id,
evicted oldest first when a limit is passed.

An entry is visible only once its data file is complete and fsynced and its
index row committed; a data file without a row (a crash mid-write) is removed
at start.  An entry whose data fails its checksum is marked corrupt, listed
as such, and never served.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from ..errors import CorepeekError
from . import safedir
from .frames import Corrupt, FrameReader, FrameWriter, Written
from .index import Entry, Index
from .limits import EntrySize, StoreLimits, to_evict

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
DATA_SUFFIX = ".zst"


class EntryNotFound(CorepeekError):
    code = grpc.StatusCode.NOT_FOUND
    help = "list the agent's stored captures with `corepeek captures`"


class EntryCorrupt(CorepeekError):
    code = grpc.StatusCode.DATA_LOSS
    help = "the stored data failed its checksum; it is never served (take a new capture)"


@dataclass
class PendingEntry:
    id: str
    fd: int
    writer: FrameWriter


class Store:
    def __init__(self, path: str, limits: StoreLimits = StoreLimits()) -> None:
        self.path = path
        self.limits = limits
        self.dir_fd = safedir.open_store_dir(path)
        index_path = os.path.join(path, INDEX_NAME)
        try:
            if not stat.S_ISREG(os.lstat(index_path).st_mode):
                raise safedir.StoreDirError(f"{index_path} is not a regular file")
        except FileNotFoundError:
            os.close(safedir.create_file(self.dir_fd, INDEX_NAME))
        self.index = Index(index_path)
        self._lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        known = {e.id for e in self.index.all()}
        for name in os.listdir(self.dir_fd):
            if name.endswith(DATA_SUFFIX) and name[:-len(DATA_SUFFIX)] not in known:
                log.warning("store: removing %s (no index entry: an interrupted write)", name)
                safedir.remove_file(self.dir_fd, name)
        for e in self.index.all():
            if not e.corrupt and not self._exists(e.id):
                self.index.mark_corrupt(e.id, "data file missing")

    def _exists(self, entry_id: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(entry_id + DATA_SUFFIX, dir_fd=self.dir_fd,
                                        follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    # -- writing ------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[PendingEntry]:
        """A new entry's writer; on an exception its partial file is removed."""
        entry_id = uuid.uuid4().hex[:16]
        fd = safedir.create_file(self.dir_fd, entry_id + DATA_SUFFIX)
        pending = PendingEntry(entry_id, fd, FrameWriter(fd))
        try:
            yield pending
        except BaseException:
            os.close(fd)
            safedir.remove_file(self.dir_fd, entry_id + DATA_SUFFIX)
            raise
        os.close(fd)

    def commit(self, pending: PendingEntry, written: Written, layout: bytes,
               meta: dict[str, Any], program: str) -> Entry:
        entry = Entry(id=pending.id, time=time.time(), program=program,
                      core_size=written.core_size, stored_bytes=written.stored_bytes,
                      sha256=written.sha256, blocks=written.table, layout=layout, meta=meta)
        with self._lock:
            self.index.add(entry)
            self._enforce(keep=entry.id)
        return entry

    def _enforce(self, keep: str = "") -> None:
        entries = [EntrySize(e.id, e.time, e.stored_bytes, e.program) for e in self.index.all()]
        vfs = os.statvfs(self.dir_fd)
        for entry_id in to_evict(entries, self.limits, vfs.f_bavail * vfs.f_frsize):
            if entry_id == keep and len(entries) == 1:
                log.warning("store: entry %s alone exceeds the limits; kept", entry_id)
                continue
            log.info("store: evicting %s (limits)", entry_id)
            self.remove(entry_id)

    def remove(self, entry_id: str) -> None:
        self.index.remove(entry_id)
        safedir.remove_file(self.dir_fd, entry_id + DATA_SUFFIX)

    # -- reading ------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return self.index.all()

    def get(self, entry_id: str) -> Entry:
        entry = self.index.get(entry_id) if entry_id.isalnum() else None
        if entry is None:
            raise EntryNotFound(f"no stored capture {entry_id!r} on this agent")
        return entry

    def open(self, entry: Entry) -> FrameReader:
        """A reader of ``entry`` once all of its blocks pass their checksums."""
        if entry.corrupt:
            raise EntryCorrupt(f"stored capture {entry.id} is corrupt: {entry.corrupt}")
        try:
            fd = safedir.open_file(self.dir_fd, entry.id + DATA_SUFFIX)
        except OSError as exc:
            self.mark_corrupt(entry.id, f"data file unreadable: {exc.strerror}")
            raise EntryCorrupt(f"stored capture {entry.id}: {exc.strerror}") from None
        reader = FrameReader(fd, entry.blocks, entry.core_size)
        try:
            reader.verify()
        except Corrupt as exc:
            os.close(fd)
            self.mark_corrupt(entry.id, str(exc))
            raise EntryCorrupt(f"stored capture {entry.id} is corrupt: {exc}") from None
        return reader

    def mark_corrupt(self, entry_id: str, why: str) -> None:
        log.error("store: entry %s is corrupt: %s; it will not be served", entry_id, why)
        self.index.mark_corrupt(entry_id, why)

    def close(self) -> None:
        self.index.close()
        os.close(self.dir_fd)

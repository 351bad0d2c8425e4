"""Where cores go: a directory or S3, each object hashed and optionally zstd-compressed.

Owns the :class:`Sink` protocol and its two implementations, the sha256 and
size of what is stored, zstd compression, ``s3://`` URLs, and each run's
records (:mod:`corepeek.runindex`).  A sink stores a core only after its
capture is closed, so hashing, compression and upload never prolong a freeze.
Every file appears under its final name only when complete and never replaces
another (:mod:`corepeek.outfile`); an S3 object appears only when its upload
completed (:mod:`corepeek.s3upload`).  boto3 and zstandard are imported only
when used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .. import runindex
from ..errors import CaptureError
from ..outfile import create_new, fsync_dir, link_new
from ..s3upload import upload_complete


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str          # "" or ends with "/"

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/some/prefix`` -> bucket ``bucket``, prefix ``some/prefix/``."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    return S3Location(bucket, f"{prefix}/" if prefix else "")


# -- hashing and compression --------------------------------------------------------

CHUNK = 1 << 20


def file_digest(f: Any) -> tuple[int, str]:
    """(size, sha256) of an open binary file from its start; holes read as zeros."""
    h = hashlib.sha256()
    size = 0
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


class _HashingWriter:
    """A binary file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def zstd_compress(src: Scratch, dst_dir: Path, level: int = 3) -> tuple[Path, int, str]:
    """Compress ``src`` into a new file in ``dst_dir`` (0600, never through a link);
    returns its path, size and sha256."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    fd, dst = create_new(dst_dir, ".zst.")
    try:
        with open(fd, "wb") as raw, open(os.dup(src.fd), "rb") as inp:
            inp.seek(0)
            hw = _HashingWriter(raw)
            cctx.copy_stream(inp, hw, size=os.fstat(src.fd).st_size, read_size=CHUNK,
                             write_size=CHUNK)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst, hw.size, hw.sha.hexdigest()


# -- the sinks ----------------------------------------------------------------------

@dataclass
class Scratch:
    """A capture's file while it is written: created new (0600) and kept open, so
    it is written through this descriptor and never reopened by name."""

    path: Path
    fd: int

    @classmethod
    def create(cls, directory: Path, name: str) -> Scratch:
        fd, path = create_new(directory, f".{name}.")
        return cls(path, fd)

    def digest(self) -> tuple[int, str]:
        """(size, sha256) of what was written; holes read as zeros."""
        os.fsync(self.fd)
        with open(os.dup(self.fd), "rb") as f:
            return file_digest(f)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Stored:
    path: str
    bytes: int
    sha256: str


class Sink(Protocol):
    destination: str

    def scratch(self, name: str) -> Scratch: ...
    def store(self, scratch: Scratch, name: str, compress: bool, level: int) -> Stored: ...
    def discard(self, scratch: Scratch) -> None: ...
    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str: ...
    def close(self) -> None: ...


class DirSink:
    """Cores as files in a directory (created 0700: cores hold process memory).

    A core is written sparse to a new ``.NAME.RANDOM.tmp`` (:class:`Scratch`)
    and linked to its name only once its capture is closed and it is complete,
    never replacing a file (a clash takes ``-2``...); with ``compress`` the
    zstd file is linked instead and the scratch removed.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.destination = str(self.dir)

    def scratch(self, name: str) -> Scratch:
        return Scratch.create(self.dir, name.removesuffix(".zst"))

    def store(self, scratch: Scratch, name: str, compress: bool, level: int = 3) -> Stored:
        if compress:
            done, size, sha = zstd_compress(scratch, self.dir, level)
            scratch.discard()
        else:
            size, sha = scratch.digest()
            scratch.close()
            done = scratch.path
        sub, _, base = name.rpartition("/")     # files/BUILD-ID (collect --with-files)
        where = self._subdir(sub) if sub else self.dir
        try:
            final = link_new(done, where, base, unique=_numbered_name)
        except BaseException:
            done.unlink(missing_ok=True)
            raise
        fsync_dir(where)
        return Stored(f"{sub}/{final}" if sub else final, size, sha)

    def _subdir(self, name: str) -> Path:
        """A directory of ours inside the output directory: made 0700, never a link."""
        path = self.dir / name
        path.mkdir(mode=0o700, exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise OSError(f"{path} is not a directory of this run's (a link or a file)")
        return path

    def discard(self, scratch: Scratch) -> None:
        scratch.discard()

    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str:
        """The run's own manifest, the index entry, and manifest.json (see runindex)."""
        body = (json.dumps(doc, indent=2) + "\n").encode()
        name = link_new(self._new_file(body), self.dir,
                        runindex.run_manifest_name(started or datetime.now(timezone.utc)),
                        unique=runindex.numbered)
        os.replace(self._new_file(body), self.dir / runindex.LATEST_NAME)
        self._append_index(runindex.index_entry(doc, name))
        fsync_dir(self.dir)
        return str(self.dir / name)

    def _new_file(self, body: bytes) -> Path:
        fd, path = create_new(self.dir, ".manifest.")
        with open(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return path

    def _append_index(self, entry: dict[str, Any]) -> None:
        """Append to runs.json under an exclusive lock of the directory (runs at once)."""
        import fcntl

        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            path = self.dir / runindex.INDEX_NAME
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with open(fd, "rb") as f:
                    old: bytes | None = f.read()
            except FileNotFoundError:
                old = None
            except OSError as exc:             # ELOOP: a planted symlink is not read
                old = f"(unreadable: {exc.strerror})".encode()
            os.replace(self._new_file(runindex.append_entry(old, entry)), path)
        finally:
            os.close(dfd)                     # releases the lock

    def close(self) -> None:
        pass


def _numbered_name(name: str, n: int) -> str:
    """``h_x_1_T.notes.core`` -> ``h_x_1_T-2.notes.core`` (as :class:`NameClaims`)."""
    stem, dot, rest = name.partition(".")
    return f"{stem}-{n}{dot}{rest}"


def _s3_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound")


class S3Sink:
    """Cores as objects under ``s3://bucket/prefix/`` (any S3-compatible store).

    Each core is written to a private local scratch directory first (the
    capture is closed, and the target thawed, before the upload starts), then
    uploaded so that its key appears only when complete
    (:func:`corepeek.s3upload.upload_complete`: one PUT, or a multipart upload
    aborted on any failure).  The object's metadata carries its sha256.  Needs
    the ``[s3]`` extra (boto3); credentials and region come from the usual AWS
    environment / config files.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, client: Any = None,
                 scratch_dir: str | None = None) -> None:
        self.location = parse_s3_url(url)
        self.destination = f"s3://{self.location.bucket}/{self.location.prefix}"
        if client is None:
            try:
                import boto3
            except ImportError:
                raise CaptureError("--out s3://... needs boto3: pip install 'corepeek[s3]'") \
                    from None
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client
        self._tmp = Path(tempfile.mkdtemp(prefix="corepeek-collect-", dir=scratch_dir))
        os.chmod(self._tmp, 0o700)

    def scratch(self, name: str) -> Scratch:
        return Scratch.create(self._tmp, name.removesuffix(".zst"))

    def store(self, scratch: Scratch, name: str, compress: bool, level: int = 3) -> Stored:
        if compress:
            upload, size, sha = zstd_compress(scratch, self._tmp, level)
            scratch.discard()
        else:
            size, sha = scratch.digest()
            scratch.close()
            upload = scratch.path
        try:
            name = self._free_name(name, _numbered_name)
            key = self.location.key(name)
            upload_complete(self.client, upload, self.location.bucket, key, extra={
                "ContentType": "application/zstd" if compress else "application/octet-stream",
                "Metadata": {"sha256": sha}})
        except Exception as exc:  # noqa: BLE001 - botocore/boto3 errors: one line
            raise CaptureError(f"upload to {self.location.url(name)} failed: {exc}") from None
        finally:
            upload.unlink(missing_ok=True)
        return Stored(self.location.url(name), size, sha)

    def discard(self, scratch: Scratch) -> None:
        scratch.discard()

    def write_manifest(self, doc: dict[str, Any], started: datetime | None = None) -> str:
        """The run's own manifest object, the index entry, and manifest.json.

        S3 has no lock: two runs finishing at the same instant into one prefix
        may each append to runs.json and one entry be lost; both runs' own
        manifests remain (docs/fleet.md).
        """
        body = (json.dumps(doc, indent=2) + "\n").encode()
        loc = self.location
        try:
            name = self._free_name(runindex.run_manifest_name(
                started or datetime.now(timezone.utc)), runindex.numbered)
            for key in (name, runindex.LATEST_NAME):
                self.client.put_object(Bucket=loc.bucket, Key=loc.key(key), Body=body,
                                       ContentType="application/json")
            try:
                old = self.client.get_object(Bucket=loc.bucket,
                                             Key=loc.key(runindex.INDEX_NAME))["Body"].read()
            except Exception as exc:  # noqa: BLE001
                if not _s3_missing(exc):
                    raise
                old = None
            self.client.put_object(Bucket=loc.bucket, Key=loc.key(runindex.INDEX_NAME),
                                   Body=runindex.append_entry(old, runindex.index_entry(doc, name)),
                                   ContentType="application/json")
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"cannot write the manifest to {loc.url(runindex.LATEST_NAME)}: "
                               f"{exc}") from None
        return loc.url(name)

    def _free_name(self, name: str, numbered: Callable[[str, int], str]) -> str:
        """``name``, or the first numbered variant no object has (another run's
        object is never replaced; S3 has no create-exclusive, so two runs at
        the same instant could still race)."""
        candidate, n = name, 1
        while self._exists(self.location.key(candidate)):
            n += 1
            candidate = numbered(name, n)
        return candidate

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if _s3_missing(exc):
                return False
            raise

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

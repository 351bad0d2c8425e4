"""Where cores go: a directory or S3, each object hashed and optionally zstd-compressed.

Owns the :class:`Sink` protocol and its two implementations, the sha256 and
size of what is stored, zstd compression, and ``s3://`` URLs.  A sink stores
a core only after its capture is closed, so hashing, compression and upload
never prolong a freeze.  boto3 and zstandard are imported only when used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CaptureError
from .manifest import MANIFEST_NAME


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


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file; holes of a sparse file read as zeros."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
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


def zstd_compress(src: Path, dst: Path, level: int = 3) -> tuple[int, str]:
    """Compress ``src`` into ``dst`` (0600); returns (size, sha256) of ``dst``."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as raw, open(src, "rb") as inp:
        hw = _HashingWriter(raw)
        cctx.copy_stream(inp, hw, size=src.stat().st_size, read_size=CHUNK, write_size=CHUNK)
    return hw.size, hw.sha.hexdigest()


# -- the sinks ----------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    path: str
    bytes: int
    sha256: str


class Sink(Protocol):
    destination: str

    def scratch(self, name: str) -> Path: ...
    def store(self, scratch: Path, name: str, compress: bool, level: int) -> Stored: ...
    def discard(self, scratch: Path) -> None: ...
    def write_manifest(self, doc: dict[str, Any]) -> str: ...
    def close(self) -> None: ...


class DirSink:
    """Cores as files in a directory (created 0700: cores hold process memory).

    A core is written sparse to ``.NAME.part`` and renamed into place once its
    capture is closed, so a name in the directory is always a complete core;
    with ``compress`` the part file is compressed into ``NAME`` and removed.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.destination = str(self.dir)

    def scratch(self, name: str) -> Path:
        return self.dir / f".{name.removesuffix('.zst')}.part"

    def store(self, scratch: Path, name: str, compress: bool, level: int = 3) -> Stored:
        final = self.dir / name
        final.parent.mkdir(mode=0o700, exist_ok=True)       # files/ (collect --with-files)
        if compress:
            part = self.dir / f".{name}.part"
            size, sha = zstd_compress(scratch, part, level)
            os.replace(part, final)
            scratch.unlink()
        else:
            size, sha = file_digest(scratch)
            os.replace(scratch, final)
        return Stored(name, size, sha)

    def discard(self, scratch: Path) -> None:
        scratch.unlink(missing_ok=True)
        Path(str(scratch).removesuffix(".part") + ".zst.part").unlink(missing_ok=True)

    def write_manifest(self, doc: dict[str, Any]) -> str:
        path = self.dir / MANIFEST_NAME
        tmp = self.dir / f".{MANIFEST_NAME}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
        return str(path)

    def close(self) -> None:
        pass


class S3Sink:
    """Cores as objects under ``s3://bucket/prefix/`` (any S3-compatible store).

    Each core is written to a local scratch directory first (the capture is
    closed, and the target thawed, before the upload starts), then uploaded
    with boto3's managed transfer (multipart for large cores).  The object's
    metadata carries its sha256.  Needs the ``[s3]`` extra (boto3); credentials
    and region come from the usual AWS environment / config files.
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

    def scratch(self, name: str) -> Path:
        return self._tmp / f"{name.removesuffix('.zst')}.part"

    def store(self, scratch: Path, name: str, compress: bool, level: int = 3) -> Stored:
        upload = scratch
        if compress:
            upload = self._tmp / f"{name}.part"
            size, sha = zstd_compress(scratch, upload, level)
            scratch.unlink()
        else:
            size, sha = file_digest(scratch)
        key = self.location.key(name)
        try:
            self.client.upload_file(
                str(upload), self.location.bucket, key,
                ExtraArgs={"ContentType": "application/zstd" if compress
                           else "application/octet-stream", "Metadata": {"sha256": sha}})
        except Exception as exc:  # noqa: BLE001 - botocore/boto3 errors: one line
            raise CaptureError(f"upload to {self.location.url(name)} failed: {exc}") from None
        finally:
            upload.unlink(missing_ok=True)
        return Stored(self.location.url(name), size, sha)

    def discard(self, scratch: Path) -> None:
        scratch.unlink(missing_ok=True)

    def write_manifest(self, doc: dict[str, Any]) -> str:
        body = (json.dumps(doc, indent=2) + "\n").encode()
        key = self.location.key(MANIFEST_NAME)
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body,
                                   ContentType="application/json")
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"cannot write the manifest to "
                               f"{self.location.url(MANIFEST_NAME)}: {exc}") from None
        return self.location.url(MANIFEST_NAME)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

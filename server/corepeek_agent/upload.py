"""Agent-side uploads: a core written straight to S3-compatible storage.

A multipart upload (8 MiB parts): nothing is visible under the key until
``complete``, and any failure aborts it, so a reader never sees a partial
core.  The SHA-256 of the object goes into its ``sha256`` tag and the RPC's
answer.  Credentials come from the agent's own environment (instance role,
IRSA, ``AWS_SHARED_CREDENTIALS_FILE`` ...), never from the client; boto3 is
imported only when an upload runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import CorepeekError, InvalidRequest, PermissionDenied

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20
_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/([^\x00-\x1f]{1,900})$")


class UploadFailed(CorepeekError):
    code = grpc.StatusCode.UNAVAILABLE
    help = "check the agent's S3 credentials, endpoint and bucket (the upload was aborted)"


@dataclass(frozen=True)
class Destination:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_destination(url: str) -> Destination:
    m = _URL.match(url)
    if not m or ".." in m.group(2).split("/") or m.group(2).startswith("/"):
        raise InvalidRequest(f"destination must be s3://bucket/key, got {url[:200]!r}")
    return Destination(m.group(1), m.group(2))


def check_allowed(dest: Destination, prefixes: tuple[str, ...], who: str) -> None:
    """The admitting rule's ``uploads`` globs must cover the destination."""
    if not any(fnmatch.fnmatchcase(dest.url, g) for g in prefixes):
        raise PermissionDenied(f"{who} may not upload to {dest.url}",
                               help="the admitting policy rule's `uploads` must list it")


class MultipartWriter:
    """The FrameWriter interface (``data``, ``zeros``) onto a multipart upload."""

    def __init__(self, client: Any, dest: Destination,
                 progress: Callable[[int], None] | None = None) -> None:
        self.client, self.dest, self.progress = client, dest, progress
        self._sha = hashlib.sha256()
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self.size = 0
        self.uploaded = 0
        try:
            self._id = client.create_multipart_upload(Bucket=dest.bucket, Key=dest.key,
                                                      ContentType="application/x-coredump")[
                "UploadId"]
        except Exception as exc:  # noqa: BLE001 - botocore errors: one line
            raise UploadFailed(f"cannot start an upload to {dest.url}: {exc}") from None

    def data(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._buf += data
        while len(self._buf) >= PART_BYTES:
            self._part(bytes(self._buf[:PART_BYTES]))
            del self._buf[:PART_BYTES]

    def zeros(self, length: int) -> None:
        while length:
            n = min(length, PART_BYTES)
            self.data(bytes(n))
            length -= n

    def _part(self, body: bytes) -> None:
        number = len(self._parts) + 1
        try:
            etag = self.client.upload_part(Bucket=self.dest.bucket, Key=self.dest.key,
                                           UploadId=self._id, PartNumber=number,
                                           Body=body)["ETag"]
        except Exception as exc:  # noqa: BLE001
            raise UploadFailed(f"upload to {self.dest.url} failed at part {number}: "
                               f"{exc}") from None
        self._parts.append({"PartNumber": number, "ETag": etag})
        self.uploaded += len(body)
        if self.progress is not None:
            self.progress(self.uploaded)

    def complete(self) -> str:
        """Upload the last part, make the object visible, tag it; its SHA-256."""
        if self._buf or not self._parts:
            self._part(bytes(self._buf))
            self._buf.clear()
        digest = self._sha.hexdigest()
        try:
            self.client.complete_multipart_upload(
                Bucket=self.dest.bucket, Key=self.dest.key, UploadId=self._id,
                MultipartUpload={"Parts": self._parts})
        except Exception as exc:  # noqa: BLE001
            raise UploadFailed(f"cannot complete the upload to {self.dest.url}: {exc}") from None
        try:
            self.client.put_object_tagging(Bucket=self.dest.bucket, Key=self.dest.key,
                                           Tagging={"TagSet": [{"Key": "sha256",
                                                                "Value": digest}]})
        except Exception as exc:  # noqa: BLE001 - the object is complete; say so
            log.warning("upload %s: complete, but tagging failed: %s", self.dest.url, exc)
        return digest

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.dest.bucket, Key=self.dest.key,
                                               UploadId=self._id)
        except Exception as exc:  # noqa: BLE001
            log.warning("upload %s: abort failed: %s", self.dest.url, exc)


def s3_client(endpoint_url: str | None) -> Any:
    try:
        import boto3
    except ImportError:
        raise UploadFailed("this agent cannot upload: boto3 is not installed") from None
    return boto3.client("s3", endpoint_url=endpoint_url or None)

"""Uploading a finished core to S3 so that its key exists only once it is complete.

A single ``PutObject`` is atomic already (small cores).  A larger file goes up
as a multipart upload whose parts are invisible until
``CompleteMultipartUpload``; any failure on the way -- a part refused, the
connection cut, Ctrl-C -- aborts the upload, so no object and no stray
parts (which S3 bills for) remain.  boto3's managed transfer would do the
same in most cases, but says nothing of it; this makes the promise explicit
and testable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PART_BYTES = 8 * 1024 * 1024        # S3's minimum part is 5 MiB; at most 10,000 parts
MAX_PARTS = 10_000


def part_size(size: int, minimum: int = PART_BYTES) -> int:
    """A part size that fits ``size`` into at most MAX_PARTS parts (MiB-aligned)."""
    need = -(-size // MAX_PARTS)
    mib = 1024 * 1024
    return max(minimum, -(-need // mib) * mib)


def upload_complete(client: Any, path: Path, bucket: str, key: str, *,
                    extra: dict[str, Any] | None = None, part_bytes: int = PART_BYTES) -> None:
    """Upload ``path`` to ``bucket/key``; the key appears only when all of it is there."""
    extra = extra or {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= part_bytes:
            client.put_object(Bucket=bucket, Key=key, Body=f.read(), **extra)
            return
        step = part_size(size, part_bytes)
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, step), start=1):
                f.seek(offset)
                body = f.read(step)
                resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                          PartNumber=number, Body=body)
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                             MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
                log.warning("could not abort the multipart upload of s3://%s/%s (%s): %s; "
                            "a bucket lifecycle rule for incomplete uploads removes it",
                            bucket, key, upload_id, exc)
            raise

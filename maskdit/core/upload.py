"""Streaming atomic writes: a file-like object that a serializer (`torch.save`) writes into, and that becomes
the object at a URI only when it is closed without an error.

- local: a hidden temp file next to the target, fsync, rename (`storage`'s atomic write);
- S3: a multipart upload fed part by part as the bytes arrive, so at most `PARTS_IN_FLIGHT + 1`
  parts of `s3.SETTINGS.multipart_chunksize` are in memory whatever the object's size (never the whole
  object); the object appears only at CompleteMultipartUpload; an error aborts the upload. A process
  killed mid-upload leaves an invisible incomplete upload (the bucket's AbortIncompleteMultipartUpload
  lifecycle rule cleans it up), never a visible object.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO

from maskdit.core import s3, storage
from maskdit.core.storage_errors import s3_errors, split_s3

log = logging.getLogger(__name__)
PARTS_IN_FLIGHT = 4  # parts uploading at once while the serializer fills the next one
MIN_PART = 5 * s3.MiB  # S3's smallest part (all but the last)


class _MultipartWriter:
    """`write()` bytes into a multipart upload of `s3://bucket/key`; `finish()` completes, `abort()` drops it."""

    def __init__(self, uri: str):
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.part_size = max(s3.SETTINGS.multipart_chunksize, MIN_PART)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future] = []
        self.slots = threading.Semaphore(PARTS_IN_FLIGHT)
        self.pool = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT, thread_name_prefix="maskdit-part")
        self.written = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while len(view):
            take = min(self.part_size - len(self.buffer), len(view))
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) >= self.part_size:
                self._send()
        self.written += size
        return size

    def flush(self) -> None:  # parts go out when full; torch.save calls this
        pass

    def _send(self) -> None:
        with s3_errors(self.uri, "write"):
            if self.upload_id is None:
                self.upload_id = s3.client().create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        body, self.buffer = self.buffer, bytearray()  # handed over, not copied
        number = len(self.parts) + 1
        self.slots.acquire()  # bounded memory: wait while PARTS_IN_FLIGHT parts are uploading
        self.parts.append(self.pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytearray) -> dict:
        try:
            with s3_errors(self.uri, "write"):
                reply = s3.client().upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": reply["ETag"]}
        finally:
            self.slots.release()

    def finish(self) -> None:
        try:
            with s3_errors(self.uri, "write"):
                if self.upload_id is None:  # small: one PUT
                    s3.client().put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
                    return
                if self.buffer:
                    self._send()
                parts = [part.result() for part in self.parts]
                s3.client().complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                      MultipartUpload={"Parts": parts})
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            try:
                s3.client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception as error:  # noqa: BLE001 - the lifecycle rule removes what an abort could not
                log.warning("could not abort the multipart upload of %s (%s); the bucket's lifecycle rule "
                            "removes it", self.uri, error)


@contextmanager
def open_write(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A writable stream that becomes the object at `uri` when the block ends without an error; nothing otherwise."""
    uri = str(uri)
    if storage.is_s3(uri):
        writer = _MultipartWriter(uri)
        try:
            yield writer  # type: ignore[misc]
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        return
    try:
        with storage._atomic_local(storage.local_path(uri)) as handle:
            yield handle
    except OSError as error:
        raise storage.StorageError(f"cannot write {uri}: {error}") from None

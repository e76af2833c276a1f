"""One storage API over URIs: local paths, `file://...` and `s3://bucket/key`.

Everything that writes or reads artifacts (latents, checkpoints, samples, statistics) goes
through these functions, so the laptop and the cluster differ only in the URI.

S3 goes through boto3; the client (endpoint, credentials, retries) and the transfer settings
are in `maskdit/core/s3.py`, botocore's errors as `StorageError` in `maskdit/core/storage_errors.py`.
Here: URIs and atomic writes.

Writes are atomic: a reader never sees half an object.
- local: write a temporary file in the same folder, fsync, then `os.replace`;
- S3: one PUT, or a multipart upload whose object appears only at CompleteMultipartUpload;
  a failed multipart upload is aborted (boto3's managed transfer does this), so nothing is left.
  A process killed mid-upload leaves an invisible incomplete upload: an
  `AbortIncompleteMultipartUpload` lifecycle rule on the bucket cleans those up.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from maskdit.core import s3
from maskdit.core.retry import retrying
from maskdit.core.storage_errors import (  # the storage API raises these: storage.StorageError etc.
    NoSpaceError,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    missing_bucket_check,
    s3_errors,
    split_s3,
)

_PARTIAL = ".partial"  # suffix of in-flight local writes; never listed
_COPY_CHUNK = 8 * 1024 * 1024  # bytes a local copy reads at a time


# ------------------------------------------------------------------------------------------
# URIs
# ------------------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | os.PathLike) -> Path:
    """The file system path of a local path or `file://` URI."""
    text = str(uri)
    if is_s3(text):
        raise StorageError(f"{text!r} is an S3 URI, not a local path")
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return Path(text).expanduser()


def inside(uri: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `uri` names something under `folder` (same store; `..` and symlinks resolved)."""
    import posixpath

    if is_s3(uri) != is_s3(folder):
        return False
    if is_s3(uri):
        (bucket, key), (root_bucket, root) = split_s3(str(uri)), split_s3(str(folder))
        key, root = posixpath.normpath("/" + key), posixpath.normpath("/" + root)
        return bucket == root_bucket and key.startswith(root.rstrip("/") + "/")
    path, root_path = local_path(uri).resolve(), local_path(folder).resolve()
    return path != root_path and path.is_relative_to(root_path)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """`join("s3://b/run", "shards", "x.safetensors")` -> `"s3://b/run/shards/x.safetensors"`."""
    text = str(uri)
    if is_s3(text) or text.startswith("file://"):
        pieces = [text.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    return str(Path(text, *parts))


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)(?P<name>[?&;][^=&#\s]*(?:pass|pwd|secret|token|key|signature|credential|auth|sig)"
                           r"[^=&#\s]*=)[^&#\s]+")
REDACTED = "***"


def redact(value: Any) -> Any:
    """`value` with URI credentials masked, for logs, prints and stored configs.

    In every string: userinfo (`http://user:pass@host` -> `http://***@host`) and query values
    whose name says secret (`?token=`, `&X-Amz-Signature=`, `password`, `key`, ...). Dicts, lists
    and tuples are redacted value by value; anything else is returned as is.
    """
    if isinstance(value, str):
        return _SECRET_QUERY.sub(rf"\g<name>{REDACTED}", _USERINFO.sub(rf"\g<scheme>{REDACTED}@", value))
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------
# Local atomic writes
# ------------------------------------------------------------------------------------------


@contextmanager
def _atomic_local(path: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file next to `path`; on success fsync and rename it over `path`, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_stream(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(_COPY_CHUNK):
        dst.write(chunk)


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def _retried(function):
    """`function` retried while the store is unavailable (maskdit/core/retry.py); its first argument names it."""
    import functools

    @functools.wraps(function)
    def wrapper(uri, *args, **kwargs):
        return retrying(lambda: function(uri, *args, **kwargs), f"storage {redact(str(uri))}")

    return wrapper


def put_fileobj(fileobj: IO[bytes], uri: str | os.PathLike) -> None:
    """Write everything `fileobj` yields to `uri`, atomically (managed multipart on S3 when large);
    retried from where it started when the store is unavailable and `fileobj` can seek. Left open."""
    start = fileobj.tell() if fileobj.seekable() else None

    def rewound() -> s3.KeepOpen:
        if start is not None:
            fileobj.seek(start)
        return s3.KeepOpen(fileobj)

    _put(rewound, str(uri), retried=start is not None)


def put_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `uri` atomically; retried while the store is unavailable."""
    import io

    _put(lambda: io.BytesIO(data), str(uri))


def put_file(path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy the local file `path` to `uri` atomically; retried while the store is unavailable."""
    _put(lambda: open(path, "rb"), str(uri))  # noqa: SIM115 - _put closes it (a fresh one each try)


def _put(open_source, uri: str, retried: bool = True) -> None:
    """Write the stream `open_source()` gives (a fresh one each try) to `uri`."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def upload() -> None:
            with open_source() as source, s3_errors(uri, "write"):
                s3.client().upload_fileobj(source, bucket, key, Config=s3.transfer_config())

        retrying(upload, f"storage {uri}", budget=None if retried else 0)
        return
    try:
        with open_source() as source, _atomic_local(local_path(uri)) as handle:
            _copy_stream(source, handle)
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise NoSpaceError(f"cannot write {uri}: {error.strerror}") from None
        raise StorageError(f"cannot write {uri}: {error}") from None


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def remove_partials(dir_uri: str | os.PathLike, name_glob: str = "*") -> list[Path]:
    """Delete the hidden `.partial` files that writers of `name_glob` killed mid-write (SIGKILL) left in the
    local folder `dir_uri` (S3 keeps no partial objects); the caller must be the folder's only writer."""
    if is_s3(dir_uri) or not local_path(dir_uri).is_dir():
        return []
    stale = [p for p in local_path(dir_uri).glob(f".{name_glob}.*{_PARTIAL}") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@_retried
def get_bytes(uri: str | os.PathLike) -> bytes:
    """The whole object at `uri`; `ObjectNotFound` when it does not exist."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri, "read"):
            return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return local_path(uri).read_bytes()
    except FileNotFoundError:
        raise ObjectNotFound(f"cannot read {uri}: no such file") from None
    except OSError as error:
        raise StorageError(f"cannot read {uri}: {error}") from None


@_retried
def get_file(uri: str | os.PathLike, path: str | os.PathLike) -> None:
    """Download `uri` to the local file `path` (parallel ranged GETs on S3); atomic on disk."""
    uri, path = str(uri), Path(path)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with _atomic_local(path) as handle, s3_errors(uri, "read"):
                s3.client().download_fileobj(bucket, key, handle, Config=s3.transfer_config())
        except ObjectNotFound:
            missing_bucket_check(uri, "read")
            raise
        return
    try:
        with open(local_path(uri), "rb") as src, _atomic_local(path) as dst:
            _copy_stream(src, dst)
    except FileNotFoundError:
        raise ObjectNotFound(f"cannot read {uri}: no such file") from None
    except OSError as error:
        raise StorageError(f"cannot copy {uri} to {path}: {error}") from None


@_retried
def exists(uri: str | os.PathLike) -> bool:
    """Whether an object (or local file) is at `uri`; a missing bucket is an error, not False."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with s3_errors(uri, "check"):
                s3.client().head_object(Bucket=bucket, Key=key)
            return True
        except ObjectNotFound:
            missing_bucket_check(uri, "check")
            return False
    return local_path(uri).is_file()


def list_uris(prefix_uri: str | os.PathLike) -> list[str]:
    """Every object under the folder `prefix_uri` (recursively), sorted; [] when there is none."""
    return [found.uri for found in list_objects(prefix_uri)]


@dataclass(frozen=True)
class StoredObject:
    """One object of a listing: its URI, size and version (the S3 ETag, or a local file's mtime in ns)."""

    uri: str
    size: int
    version: str


@_retried
def list_objects(prefix_uri: str | os.PathLike) -> list[StoredObject]:
    """`list_uris` with each object's size and version, from the listing alone (no object is read)."""
    uri = str(prefix_uri)
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        found: list[StoredObject] = []
        with s3_errors(uri, "list"):
            pages = s3.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": s3.SETTINGS.list_page_size})
            for page in pages:
                found += [StoredObject(f"s3://{bucket}/{item['Key']}", int(item["Size"]), item["ETag"].strip('"'))
                          for item in page.get("Contents", []) if not item["Key"].endswith("/")]
        return sorted(found, key=lambda o: o.uri)
    root = local_path(uri)
    if not root.is_dir():
        return []
    scheme = "file://" if str(uri).startswith("file://") else ""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(_PARTIAL):
            info = path.stat()
            found.append(StoredObject(f"{scheme}{path}", info.st_size, str(info.st_mtime_ns)))
    return sorted(found, key=lambda o: o.uri)


@_retried
def delete(uri: str | os.PathLike) -> None:
    """Remove the object at `uri`; no error when it is already gone."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri, "delete"):
            s3.client().delete_object(Bucket=bucket, Key=key)
        return
    local_path(uri).unlink(missing_ok=True)


def check_writable(uri: str | os.PathLike, what: str = "output") -> None:
    """Fail now, not after hours of work, when nothing can be written at `uri` (a file or folder URI).

    Writes and deletes a small probe object beside `uri`: the only check that is true for every
    store (permissions, a read-only mount, a missing bucket, a policy that denies PutObject).
    """
    probe = f"{str(uri).rstrip('/')}.maskdit-write-probe"
    try:
        put_bytes(probe, b"")
        delete(probe)
    except StorageUnavailable:
        raise
    except StorageError as error:
        raise StorageError(f"cannot write the {what} {uri}: {error}") from None
    except OSError as error:  # a local path under a file, or a folder we may not create
        raise StorageError(f"cannot write the {what} {uri}: {error.strerror or error}; pick a writable location") from None


def get_tree(prefix_uri: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Download every object under `prefix_uri` into `directory`, keeping relative paths.

    A key that would land outside `directory` (`..`, an absolute part; S3 allows both) is refused
    before anything is written.
    """
    uri, directory = str(prefix_uri).rstrip("/"), Path(directory)
    found = list_uris(uri)
    if not found:
        raise ObjectNotFound(f"nothing under {uri}; check the URI")
    root = directory.resolve()
    targets = []
    for item in found:
        relative = item[len(uri):].lstrip("/")
        target = (root / relative).resolve()
        parts = Path(relative).parts
        if ".." in parts or target == root or not target.is_relative_to(root):
            raise StorageError(f"{item} would be written outside {directory} (its key has '..' or is absolute): "
                               f"remove or rename that object under {uri}")
        targets.append((item, target))
    for item, target in targets:
        get_file(item, target)
    return directory

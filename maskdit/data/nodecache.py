"""The node cache of encoded datasets: fetch once per node, verify, memory-map everywhere.

`mapped_shards` fetches a dataset's shards once per node into a private cache (default
/dev/shm/maskdit-data-<uid>, mode 0700), verifies their sha256 against the manifest on every load
(and, in the same check, that a latent shard's values are finite and in range, naming the row),
and memory-maps them: every process on the node shares the same page-cache pages instead of
holding its own copy. The manifest comes from the data bucket and is not trusted: a shard's
header is checked before any tensor is built on it, and files in the cache are never followed
through symlinks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from maskdit.core import storage
from maskdit.core.cache import cache_dir as cache_rule
from maskdit.data.shards import Manifest, ShardError, ShardInfo, check_values, shard_uri

SHM = Path("/dev/shm")  # the node's RAM disk: home of the default shard cache


def default_cache_dir() -> Path:
    """MASKDIT_DATA_CACHE, else MASKDIT_CACHE/data, else /dev/shm/maskdit-data-<uid> (RAM, shared by the node),
    else the temp dir (the rule of maskdit/core/cache.py, with the node's RAM disk as this kind's default)."""
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(tempfile.gettempdir())
    return cache_rule("data", env="MASKDIT_DATA_CACHE", default=base / f"maskdit-data-{os.getuid()}")


def _private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter (0700): made here, or already ours and not a link.

    The cache sits in a folder every user can write (/dev/shm): another user could plant a folder or
    a symlink at our name first, so an existing one is checked, never trusted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a folder" if not stat.S_ISDIR(info.st_mode) \
            else f"owned by uid {info.st_uid}"
        raise ShardError(f"the data cache {path} is {kind}, not a private folder of this user (uid {os.getuid()}); "
                         "remove it, or set MASKDIT_DATA_CACHE (data.cache_dir) to a folder of your own")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


@contextmanager
def _node_lock(directory: Path) -> Iterator[None]:
    """One process of the node at a time (the first fetches, the others then find it done)."""
    lock = directory / ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(lock, flags, 0o600)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        os.unlink(lock)  # a link planted before the folder was private: drop it, never write through it
        fd = os.open(lock, flags | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open(path: Path, follow: bool = True):
    """`path` opened for reading; with `follow=False` a symlink there is an error (ELOOP), not followed."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)), "rb")


def _regular_size(path: Path) -> int | None:
    """Size of the regular file at `path` (a symlink there does not count), else None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def file_sha256(path: Path, follow: bool = True) -> str:
    digest = hashlib.sha256()
    with _open(path, follow) as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _launch_id() -> str | None:
    """What the local ranks of one torchrun launch share and no other launch has; None outside torchrun.

    The torchrun agent is every rank's parent: its pid with its start time (unique per boot) names
    the launch, so ranks 1..7 reuse rank 0's check while a restart, a resume or a later run re-hashes.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        started = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{os.environ['TORCHELASTIC_RUN_ID']}:{os.getppid()}:{started}"


def _fetch_shard(source: str, cache: Path, shard: ShardInfo, verify: bool,
                 check: Callable[[Path, bool], None] | None = None) -> Path:
    """The local path of `shard` (downloaded into `cache` unless `source` is local), verified.

    With `verify` every load hashes the shard and, once the hash matches, `check`s its values (finite,
    in range); only the ranks of one torchrun launch share the check (a marker in the private cache
    naming the launch, the file's size, mtime and inode). Files in the cache are never followed through
    symlinks.
    """
    remote = storage.is_s3(source)
    path = cache / shard.name if remote else storage.local_path(source)
    marker = cache / f"{shard.name}.verified"
    follow = not remote

    def stamp() -> str | None:
        launch = _launch_id()
        if launch is None:
            return None
        info = os.stat(path, follow_symlinks=follow)
        return f"{shard.sha256} {info.st_size} {info.st_mtime_ns} {info.st_ino} {launch}"

    def marked() -> bool:
        try:
            with _open(marker, follow=False) as handle:
                return (expected := stamp()) is not None and handle.read().decode() == expected
        except OSError:
            return False

    def verified() -> str | None:
        """None when the file's sha256 matches (and the check is recorded), else the sha256 found."""
        actual = file_sha256(path, follow)
        if actual != shard.sha256:
            return actual
        if check is not None:
            check(path, follow)
        if (current := stamp()) is not None:
            storage.put_bytes(str(marker), current.encode())
        return None

    def corrupt(actual: str) -> ShardError:
        return ShardError(f"shard {source} is corrupt: sha256 {actual} but the manifest says {shard.sha256}; "
                          "delete it and re-run `maskdit encode` with the same --out")

    def wrong_size(size: int | None) -> ShardError:
        what = "is missing" if size is None else f"has {size} bytes, the manifest says {shard.bytes}"
        return ShardError(f"shard {source} {what}; re-run `maskdit encode` with the same --out")

    size = _regular_size(path) if remote else (path.stat().st_size if path.is_file() else None)
    if size == shard.bytes:
        if not verify or marked() or (actual := verified()) is None:
            return path
        if not remote:
            raise corrupt(actual)
    elif not remote:
        raise wrong_size(size)
    # remote, and the cached copy is absent, of the wrong size or no longer matching: download it.
    # The download is a temp file renamed over `path`: it replaces a planted link, never follows it.
    storage.get_file(source, path)
    if verify and (actual := verified()) is not None:
        path.unlink(missing_ok=True)
        raise corrupt(actual)
    if not verify and (size := _regular_size(path)) != shard.bytes:
        raise wrong_size(size)
    return path


def _check_room(cache: Path, manifest: Manifest) -> None:
    """Fail before downloading when the cache cannot hold the missing shards (Docker's /dev/shm is 64 MB)."""
    missing = sum(s.bytes for s in manifest.shards if _regular_size(cache / s.name) != s.bytes)
    free = shutil.disk_usage(cache).free
    if missing > free:
        raise ShardError(f"the data cache {cache} has {free / 2**30:.2f} GiB free but the dataset needs "
                         f"{missing / 2**30:.2f} GiB more: enlarge /dev/shm (Kubernetes: a memory emptyDir with a "
                         "sizeLimit) or point MASKDIT_DATA_CACHE at a bigger local disk")


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64,
           "U8": torch.uint8}


def mmap_safetensors(path: Path, source: str | None = None, follow: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped copy-on-write (pages shared through the page cache).

    The header is checked against the file (dtypes, shapes, offsets inside the data) before any
    tensor is built, so a damaged shard is a `ShardError` naming `source`, even with verify off.
    """
    name = source or str(path)

    def damaged(why: str) -> ShardError:
        return ShardError(f"shard {name} is damaged ({why}); re-run `maskdit encode` with the same --out "
                          "(keep data.verify on to catch this by checksum)")

    with _open(path, follow) as handle:
        size = os.fstat(handle.fileno()).st_size
        header_len = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_len > size - 8:
            raise damaged(f"header length {header_len} but the file has {size} bytes")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, ValueError) as error:
            raise damaged(f"header is not JSON: {error}") from None
        data_len = size - 8 - header_len
        if not isinstance(header, dict):
            raise damaged("header is not a JSON object")
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _DTYPES[meta["dtype"]]
                shape = [int(d) for d in meta["shape"]]
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise damaged(f"tensor {key!r} has the header entry {meta!r}") from None
            if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize \
                    or min(shape, default=0) < 0:
                raise damaged(f"tensor {key!r} {meta['dtype']} {shape} at bytes {begin}..{end} does not fit "
                              f"the {data_len} data bytes")
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = _DTYPES[meta["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + header_len + begin)
                if count else torch.empty(0, dtype=dtype))
        tensors[key] = flat.reshape(meta["shape"])
    return tensors


def mapped_shards(root: str, manifest: Manifest, verify: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> list[dict[str, torch.Tensor]]:
    """The tensors of each non-empty shard of the dataset at `root`, fetched once per node, checksummed,
    memory-mapped.

    Under torchrun the processes of a node serialise on a file lock in the cache: the first
    downloads and verifies, the others then find verified copies and only map them.
    """
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir is None and "MASKDIT_DATA_CACHE" not in os.environ:
        _private_dir(base)  # the per-user folder in the shared /dev/shm
    cache = _private_dir(base / key)
    remote = storage.is_s3(root)
    with _node_lock(cache):
        if remote:
            _check_room(cache, manifest)
        paths = [_fetch_shard(shard_uri(root, s.name), cache, s, verify, _value_check(root, s, manifest))
                 for s in manifest.shards]
    return [mmap_safetensors(p, shard_uri(root, s.name), follow=not remote)
            for p, s in zip(paths, manifest.shards) if s.count > 0]


def _value_check(root: str, shard: ShardInfo, manifest: Manifest) -> Callable[[Path, bool], None] | None:
    """The check of a latent shard's values (maskdit.data.shards.check_values) made once its sha256 matches."""
    if manifest.space != "latent":
        return None  # uint8 pixels: every value is a valid one
    source = shard_uri(root, shard.name)
    return lambda path, follow: check_values(mmap_safetensors(path, source, follow), source, manifest.scale_factor)

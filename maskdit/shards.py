"""The encoded dataset: safetensors shards of posterior moments (or pixels) plus a manifest.

Layout under the dataset URI (see docs/data.md for the why):

    manifest.json                    written last: its presence means the dataset is complete
    shards/shard-000000.safetensors  "mean", "logvar" float16 (n, C, h, w) + "labels" int64 (n,)
    shards/shard-000000.json         sidecar written after each shard (count, sha256, skipped files)

Pixel-space datasets store "pixels" uint8 (n, C, H, W) instead of the moments.

`load_dataset` fetches the shards once per node into a cache (default /dev/shm), verifies their
sha256 against the manifest, and memory-maps them: every process on the node shares the same
page-cache pages instead of holding its own copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from maskdit import storage
from maskdit.config import StrictModel
from maskdit.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"


class ShardError(UserError, RuntimeError):
    """A shard is missing or corrupt; the message names it and says what to do."""


class ShardInfo(StrictModel):
    name: str  # file name under shards/
    count: int  # samples (rows) in the shard, flipped copies included
    sha256: str
    bytes: int


class Skipped(StrictModel):
    path: str
    reason: str


class Manifest(StrictModel):
    format_version: int = FORMAT_VERSION
    space: Literal["latent", "pixel"]
    count: int  # samples (rows) over all shards
    images: int  # source images encoded (count = 2 * images with flipped copies)
    channels: int  # C of x0
    resolution: int  # side of the (cropped) source images, pixels
    shape: tuple[int, int, int]  # x0 (C, H, W): what the model sees
    dtype: str  # storage dtype of "mean"/"logvar" (latent) or "pixels" (pixel)
    scale_factor: float  # x0 = scale_factor * z (0.18215 for the SD VAE; 1 in pixel space)
    vae: str | None = None  # hub id, local dir or object-store dir of the VAE; None in pixel space
    class_names: list[str]
    flip: bool = False  # each shard holds its images, then their horizontally flipped copies
    shard_size: int  # source images per shard (the last one may hold fewer)
    shards: list[ShardInfo]
    skipped: list[Skipped] = Field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_uri(dataset_uri: str, name: str) -> str:
    return storage.join(dataset_uri, SHARDS, name)


def write_shard(dataset_uri: str, index: int, tensors: dict[str, torch.Tensor]) -> ShardInfo:
    """Serialise `tensors` (contiguous CPU) as one safetensors shard; atomic; returns its info."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    info = ShardInfo(name=shard_name(index), count=int(tensors["labels"].shape[0]),
                     sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    storage.put_bytes(shard_uri(dataset_uri, info.name), data)
    return info


def write_manifest(dataset_uri: str, manifest: Manifest) -> None:
    storage.put_bytes(storage.join(dataset_uri, MANIFEST), manifest.model_dump_json(indent=1).encode())


def _dataset_root(uri: str) -> str:
    uri = str(uri).rstrip("/")
    return uri[: -len(MANIFEST) - 1] if uri.endswith("/" + MANIFEST) else uri


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset at `uri` (its folder or its manifest.json)."""
    root = _dataset_root(uri)
    try:
        raw = storage.get_bytes(storage.join(root, MANIFEST))
    except storage.ObjectNotFound:
        raise ShardError(f"no {MANIFEST} under {root}: not an encoded dataset, or its encoding has not "
                         "finished; run `maskdit encode --out` there (it resumes)") from None
    manifest = Manifest.model_validate_json(raw)
    if manifest.format_version != FORMAT_VERSION:
        raise ShardError(f"{root} has shard format {manifest.format_version}; this maskdit reads "
                         f"{FORMAT_VERSION}: re-encode it")
    return manifest


# ------------------------------------------------------------------------------------------
# Node cache: fetch once, verify once, memory-map everywhere
# ------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """MASKDIT_DATA_CACHE, else /dev/shm/maskdit-data (RAM, shared by the node), else the temp dir."""
    if env := os.environ.get("MASKDIT_DATA_CACHE"):
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "maskdit-data"
    return Path(tempfile.gettempdir()) / "maskdit-data"


@contextmanager
def _node_lock(directory: Path) -> Iterator[None]:
    """One process of the node at a time (the first fetches, the others then find it done)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_shard(source: str, cache: Path, shard: ShardInfo, verify: bool) -> Path:
    """The local path of `shard` (downloaded into `cache` unless `source` is local), verified."""
    path = storage.local_path(source) if not storage.is_s3(source) else cache / shard.name
    marker = cache / f"{shard.name}.verified"

    def stamp() -> str:
        stat = path.stat()
        return f"{shard.sha256} {stat.st_size} {stat.st_mtime_ns}"

    if path.is_file() and path.stat().st_size == shard.bytes:
        if not verify or (marker.is_file() and marker.read_text() == stamp()):
            return path
    if storage.is_s3(source):
        storage.get_file(source, path)
    elif not path.is_file():
        raise ShardError(f"shard {source} is missing; re-run `maskdit encode` with the same --out")
    if verify:
        actual = file_sha256(path)
        if actual != shard.sha256:
            if storage.is_s3(source):
                path.unlink(missing_ok=True)
            raise ShardError(f"shard {source} is corrupt: sha256 {actual} but the manifest says "
                             f"{shard.sha256}; delete it and re-run `maskdit encode` with the same --out")
        marker.write_text(stamp())
    elif path.stat().st_size != shard.bytes:
        raise ShardError(f"shard {source} has {path.stat().st_size} bytes, the manifest says {shard.bytes}; "
                         "re-run `maskdit encode` with the same --out")
    return path


def _check_room(cache: Path, manifest: Manifest) -> None:
    """Fail before downloading when the cache cannot hold the missing shards (Docker's /dev/shm is 64 MB)."""
    missing = sum(s.bytes for s in manifest.shards
                  if not ((cache / s.name).is_file() and (cache / s.name).stat().st_size == s.bytes))
    free = shutil.disk_usage(cache).free
    if missing > free:
        raise ShardError(f"the data cache {cache} has {free / 2**30:.2f} GiB free but the dataset needs "
                         f"{missing / 2**30:.2f} GiB more: enlarge /dev/shm (Kubernetes: a memory emptyDir with a "
                         "sizeLimit) or point MASKDIT_DATA_CACHE at a bigger local disk")


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64,
           "U8": torch.uint8}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped copy-on-write (pages shared through the page cache)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = _DTYPES[meta["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + header_len + begin)
                if count else torch.empty(0, dtype=dtype))
        tensors[name] = flat.reshape(meta["shape"])
    return tensors


def load_dataset(uri: str, verify: bool = True, cache_dir: str | os.PathLike | None = None) -> LatentSet:
    """The encoded dataset at `uri`, fetched once per node, checksummed, memory-mapped.

    Under torchrun the processes of a node serialise on a file lock in the cache: the first
    downloads and verifies, the others then find verified copies and only map them.
    """
    root = _dataset_root(uri)
    manifest = read_manifest(root)
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache / key
    with _node_lock(cache):
        if storage.is_s3(root):
            _check_room(cache, manifest)
        paths = [_fetch_shard(shard_uri(root, s.name), cache, s, verify) for s in manifest.shards]
    parts = [mmap_safetensors(p) for p, s in zip(paths, manifest.shards) if s.count > 0]
    return LatentSet(manifest, parts)


# ------------------------------------------------------------------------------------------
# The dataset the trainer sees
# ------------------------------------------------------------------------------------------


class LatentSet:
    """Samples x0 (C, H, W) with class labels, drawn from memory-mapped shards.

    Latent space: x0 = scale_factor * (mean + exp(logvar / 2) * eps), a fresh posterior sample per
    draw (the reference code's free augmentation). Pixel space: x0 = pixels / 127.5 - 1.
    """

    def __init__(self, manifest: Manifest, shards: list[dict[str, torch.Tensor]]):
        self.manifest = manifest
        self._shards = shards
        counts = torch.tensor([int(s["labels"].shape[0]) for s in shards], dtype=torch.long)
        self._starts = torch.cumsum(counts, 0) - counts  # (S,) first global index of each shard
        self.labels = torch.cat([s["labels"] for s in shards]).long() if shards else torch.empty(0, dtype=torch.long)
        if len(self.labels) != manifest.count:
            raise ShardError(f"shards hold {len(self.labels)} samples, the manifest says {manifest.count}")
        self._decoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.shape)

    def _gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        shard_of = torch.searchsorted(self._starts, indices, right=True) - 1  # (B,)
        out = torch.empty((len(indices), *self._shards[0][name].shape[1:]), dtype=torch.float32)
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            out[where] = self._shards[s][name][indices[where] - self._starts[s]].float()
        return out

    def moments(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (mean, logvar), each (B, C, h, w) float32 (latent space only)."""
        indices = self._check(indices)
        return self._gather("mean", indices), self._gather("logvar", indices)

    def _check(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} samples")
        return indices

    def draw(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 (B, C, H, W) float32 for `indices` (B,)."""
        indices = self._check(indices)
        if self.manifest.space == "pixel":
            return self._gather("pixels", indices) / 127.5 - 1.0
        mean, logvar = self._gather("mean", indices), self._gather("logvar", indices)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        # scale * (mean + exp(logvar / 2) * eps), in place: (B, C, H, W)
        return logvar.mul_(0.5).exp_().mul_(eps).add_(mean).mul_(self.manifest.scale_factor)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images uint8 (B, H, W, 3) from x0 (B, C, H, W): VAE decode, or the pixels themselves."""
        if self._decoder is None:
            self._decoder = load_decoder(self.manifest, device=x0.device)
        return self._decoder(x0)


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (one channel repeated to three)."""
    images = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images.repeat(1, 1, 1, 3) if images.shape[-1] == 1 else images


def load_decoder(manifest: Manifest, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 -> uint8 images (B, H, W, 3): the manifest's VAE decoder, or identity in pixel space."""
    if manifest.space == "pixel":
        return to_uint8_images
    from maskdit.vae import load_vae

    vae = load_vae(manifest.vae, device=device)

    @torch.no_grad()
    def decode(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(device=device, dtype=next(vae.parameters()).dtype)
        return to_uint8_images(vae.decode(x0 / manifest.scale_factor).sample).cpu()

    return decode

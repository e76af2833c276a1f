"""The encoded dataset's format: safetensors shards of posterior moments (or pixels) plus a manifest.

Layout under the dataset URI (see docs/data.md for the why):

    manifest.json                    written last: its presence means the dataset is complete
    shards/shard-000000.safetensors  "mean", "logvar" float16 (n, C, h, w) + "labels" int64 (n,)
    shards/shard-000000.json         sidecar written after each shard (count, sha256, skipped files)

Pixel-space datasets store "pixels" uint8 (n, C, H, W) instead of the moments.

This module writes shards and the manifest and reads the manifest back. The manifest comes from
the data bucket and is not trusted: shard names must be plain file names. Loading a dataset onto
a node is maskdit.data.nodecache; the dataset the trainer sees is maskdit.data.latents.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import torch
from pydantic import Field, ValidationError, field_validator

from maskdit.core import storage
from maskdit.core.config import StrictModel
from maskdit.core.errors import UserError
from maskdit.data.identity import DatasetId

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"


class ShardError(UserError, RuntimeError):
    """A shard is missing or corrupt; the message names it and says what to do."""


_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.safetensors")


class ShardInfo(StrictModel):
    name: str  # file name under shards/: a plain name, never a path
    count: int = Field(ge=0)  # samples (rows) in the shard, flipped copies included
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """The name becomes a path on every training node: no folders, no `..`, nothing absolute."""
        if not _SHARD_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"shard name {name!r} is not a plain file name like {shard_name(0)!r}")
        return name


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
    identity: DatasetId | None = None  # what went in (maskdit.data.identity); None in datasets of older versions

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


# The values a latent shard may hold, from the arithmetic of what wrote it and what trains on it:
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the VAE's logvar to this
X0_LIMIT = 80.0  # |scale_factor * mean| above EDM's largest noise level (sigma_max 80) is no image the model can learn
_ROWS = 1024  # rows checked at a time (bounded memory)


def check_values(tensors: dict[str, torch.Tensor], source: str, scale_factor: float) -> None:
    """Every row of a latent shard finite and in range; a ShardError naming the shard, tensor and row."""
    limit = X0_LIMIT / scale_factor
    for name, values in tensors.items():
        low, high = (-limit, limit) if name.startswith("mean") else LOGVAR_RANGE if name.startswith("logvar") \
            else (None, None)
        if low is None or not values.numel():
            continue
        for start in range(0, values.shape[0], _ROWS):
            chunk = values[start:start + _ROWS].float().flatten(1)  # (rows, C * h * w)
            finite = torch.isfinite(chunk).all(1)
            ok = finite & ((chunk >= low) & (chunk <= high)).all(1)
            if not bool(ok.all()):
                first = int((~ok).nonzero()[0])
                what = ("holds NaN or Inf" if not finite[first] else
                        f"holds {float(chunk[first].abs().max()):.4g}, outside [{low:.4g}, {high:.4g}]")
                raise ShardError(f"shard {source}: row {start + first} of {name!r} {what} (x0 = {scale_factor:g} * "
                                 f"mean must stay within sigma_max {X0_LIMIT:g}); re-run `maskdit encode` into a fresh "
                                 "--out, or remove that image")


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


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def dataset_root(uri: str) -> str:
    """The dataset's folder, from its folder or its manifest.json."""
    uri = str(uri).rstrip("/")
    return uri[: -len(MANIFEST) - 1] if uri.endswith("/" + MANIFEST) else uri


def manifest_sha256(uri: str) -> str:
    """sha256 of the dataset's manifest.json as stored (its folder or the file): what a run trained on."""
    try:
        return hashlib.sha256(storage.get_bytes(storage.join(dataset_root(uri), MANIFEST))).hexdigest()
    except storage.ObjectNotFound:
        raise ShardError(f"no {MANIFEST} under {dataset_root(uri)}: not an encoded dataset") from None


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset at `uri` (its folder or its manifest.json)."""
    root = dataset_root(uri)
    try:
        raw = storage.get_bytes(storage.join(root, MANIFEST))
    except storage.ObjectNotFound:
        raise ShardError(f"no {MANIFEST} under {root}: not an encoded dataset, or its encoding has not "
                         "finished; run `maskdit encode --out` there (it resumes)") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "the file"
        what = "is empty" if not raw.strip() else f"is not a valid manifest ({where}: {problem['msg']})"
        raise ShardError(f"{storage.join(root, MANIFEST)} {what}; it is written by `maskdit encode`: "
                         "re-run the encode with the same --out, or point data.uri at an encoded dataset") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ShardError(f"{root} has shard format {manifest.format_version}; this maskdit reads "
                         f"{FORMAT_VERSION}: re-encode it")
    return manifest


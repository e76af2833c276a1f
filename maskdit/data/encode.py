"""`maskdit encode`: class folders of images -> shards of VAE posterior moments (or pixels).

Run once per dataset so that training never runs the VAE:

    images/<class>/<file>  --ADM crop, [-1, 1]-->  VAE encoder  -->  mean, logvar (float16)

- Classes are the sorted folder names; files are taken in sorted order (maskdit.data.imagefolders)
  and cut into shards of `shard_size` images, so a shard's content depends only on the input and
  the options.
- Under torchrun rank r encodes shards r, r + W, r + 2W, ... (maskdit.data.encodeworker); rank 0
  shows progress and writes the manifest after a barrier, last.
- Resumable: each shard is written atomically, then a sidecar `shard-N.json` with its sha256;
  a re-run skips every shard whose sidecar exists and whose bytes still match it. `encode.json`
  holds the options and a digest of the file list, so a re-run with other inputs is refused.
- Content-addressed: `fingerprint` computes the dataset's identity (maskdit.data.identity) from a
  listing of the input; the manifest records it. When `out` already holds a complete dataset of
  the same identity, encode returns it at once (no VAE, no image decoded). The input is listed
  again after encoding: a file changed meanwhile fails the encode (the shards would not match
  the identity) and drops the finished-shard records, so the next run encodes afresh.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field

from maskdit.core import storage
from maskdit.core.config import StrictModel
from maskdit.core.distributed import resolve_device
from maskdit.core.result import StepResult, result_uri
from maskdit.data.encodeworker import EncodeOptions, encode_shards, sidecar_uri
from maskdit.data.identity import (
    DatasetId,
    dataset_digest,
    dataset_name,
    listing_digest,
)
from maskdit.data.imagefolders import EncodeError, ImageFile, discover
from maskdit.data.mnist import MNIST
from maskdit.data.shards import (
    FORMAT_VERSION,
    SHARDS,
    Manifest,
    ShardError,
    ShardInfo,
    Skipped,
    read_manifest,
    write_manifest,
)
from maskdit.data.vae import DEFAULT_VAE, vae_identity

ENCODE_JOB = "encode.json"


class EncodeConfig(StrictModel):
    """`maskdit encode`: class folders of images -> a dataset of shards + manifest.json."""

    input: str = Field(description="folder or s3:// prefix of class folders (sorted names = class ids), or "
                                   "\"mnist\" for the bundled MNIST-5k digits (the demo extra)")
    out: str = Field(description="folder or s3:// prefix for the shards, manifest.json and result.json")
    vae: str = Field(DEFAULT_VAE, description="AutoencoderKL: hub id, local or s3:// directory (not in pixel space)")
    resolution: int = Field(256, description="side of the ADM center crop in pixels (a multiple of 8 for a VAE)")
    batch_size: int = Field(64, ge=1, description="images per VAE forward")
    shard_size: int = Field(4096, ge=1, description="source images per shard")
    flip: bool = False  # also store horizontally flipped copies
    pixel_space: bool = False  # no VAE: store the [-1, 1] pixels
    grayscale: bool = False  # one channel (pixel space only)
    device: str | None = None  # None: cuda:LOCAL_RANK if any, else cpu
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on GPU, float32 on CPU
    workers: int = Field(8, ge=1, description="threads decoding images")
    progress: bool = True  # a progress bar on rank 0
    dataset_id: str | None = Field(None, description="the identity (sha256) the input must still have, e.g. from a "
                                   "fingerprint step; encode fails before writing anything when it does not")


class EncodeResult(StepResult):
    kind: Literal["encode"] = "encode"
    dataset: str  # the dataset URI (shards + manifest.json)
    manifest: str  # its manifest.json
    space: Literal["latent", "pixel"]
    count: int  # samples (images, plus flipped copies)
    images: int  # source images encoded
    num_classes: int
    shape: list[int]  # one sample (C, H, W)
    skipped: int  # images that could not be used (the manifest says why)
    dataset_id: str = ""  # the dataset's identity (sha256, maskdit.data.identity)
    reused: bool = False  # the dataset was already there (same identity): nothing was encoded


def run(cfg: EncodeConfig) -> EncodeResult | None:
    """Encode as configured and write result.json into the dataset; the result on rank 0, None elsewhere."""
    manifest, reused = _encode(cfg)
    if manifest is None:
        return None
    out = cfg.out.rstrip("/")
    result = EncodeResult(dataset=out, manifest=storage.join(out, "manifest.json"), space=manifest.space,
                          count=manifest.count, images=manifest.images, num_classes=manifest.num_classes,
                          shape=list(manifest.shape), skipped=len(manifest.skipped),
                          dataset_id=manifest.identity.digest, reused=reused)
    result.write(result_uri(out))
    return result


def encode(cfg: EncodeConfig) -> Manifest | None:
    """Encode the class folders at `cfg.input` into shards + manifest at `cfg.out` (see module doc).

    Returns the manifest on rank 0 (None on other ranks).
    """
    return _encode(cfg)[0]


# ------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------


def _options(cfg: EncodeConfig) -> EncodeOptions:
    """The options that shape the shards, checked."""
    if cfg.resolution < 8 or (cfg.resolution % 8 and not cfg.pixel_space):
        raise EncodeError(f"resolution={cfg.resolution}: use a multiple of 8, the VAE's factor (256 for ImageNet)")
    if cfg.grayscale and not cfg.pixel_space:
        raise EncodeError("grayscale=true needs pixel_space=true (a VAE expects RGB)")
    return EncodeOptions(vae=None if cfg.pixel_space else cfg.vae, resolution=cfg.resolution,
                         shard_size=cfg.shard_size, flip=cfg.flip, pixel_space=cfg.pixel_space,
                         grayscale=cfg.grayscale, dtype=None if cfg.pixel_space else cfg.dtype)


def _source(cfg: EncodeConfig, files: list[ImageFile]) -> dict:
    """What identifies the input: the bundled digits' file, or the listing of the image files."""
    if cfg.input == MNIST:
        from maskdit.data.mnist import bundled_source

        return bundled_source()
    return {"kind": "listing", "sha256": listing_digest((f.relative, f.size, f.version) for f in files),
            "files": len(files), "bytes": sum(f.size for f in files)}


def _identity(cfg: EncodeConfig, options: EncodeOptions, source: dict, vae: str) -> DatasetId:
    shaping = {k: v for k, v in asdict(options).items() if k not in ("vae", "resolution")}
    digest = dataset_digest(source, options.resolution, vae, shaping, FORMAT_VERSION)
    base = MNIST if cfg.input == MNIST else PurePosixPath(cfg.input.rstrip("/")).name
    return DatasetId(digest=digest, name=dataset_name(base, digest), files=source["files"], bytes=source["bytes"])


def fingerprint(cfg: EncodeConfig) -> DatasetId:
    """The identity of the dataset `cfg` makes (maskdit.data.identity), from listings: no image is opened.

    `cfg.out` plays no part: the same input and options give the same identity wherever it goes.
    """
    options = _options(cfg)
    files = [] if cfg.input == MNIST else discover(cfg.input)[1]
    return _identity(cfg, options, _source(cfg, files), "pixel_space" if cfg.pixel_space else vae_identity(cfg.vae))


def reusable(out: str, identity: DatasetId) -> bool:
    """Whether `out` already holds the complete dataset of `identity` (then encode does nothing)."""
    return _reusable(out.rstrip("/"), identity) is not None


@contextmanager
def _input_folder(cfg: EncodeConfig) -> Iterator[str]:
    """The input as a folder or prefix of class folders (the bundled digits: written to a temporary one)."""
    if cfg.input != MNIST:
        yield cfg.input
        return
    from maskdit.data.mnist import write_mnist

    with tempfile.TemporaryDirectory(prefix="maskdit-mnist-") as tmp:
        write_mnist(Path(tmp) / MNIST)
        yield str(Path(tmp) / MNIST)


def _reusable(out: str, identity: DatasetId) -> Manifest | None:
    """The manifest at `out` when it is complete and of `identity` (every shard there, of its size), else None.

    Shard contents are checked by every load (data.verify), not here: that would read the whole dataset.
    """
    try:
        manifest = read_manifest(out)
    except ShardError:
        return None
    if manifest.identity is None or manifest.identity.digest != identity.digest:
        return None
    sizes = {PurePosixPath(o.uri).name: o.size for o in storage.list_objects(storage.join(out, SHARDS))}
    return manifest if all(sizes.get(s.name) == s.bytes for s in manifest.shards) else None


# ------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)
# ------------------------------------------------------------------------------------------
# Not maskdit.core.distributed.setup: encode needs barriers only, so gloo on every node (no NCCL, no
# GPU bound to the group), and it destroys the process group only when it created it.


def _dist_setup() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")  # only barriers are needed: gloo works on every node
    return dist.get_rank(), dist.get_world_size(), created


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------
# The encode
# ------------------------------------------------------------------------------------------


def _encode(cfg: EncodeConfig) -> tuple[Manifest | None, bool]:
    """(the manifest on rank 0, else None; whether an existing dataset of the same identity was reused)."""
    options = _options(cfg)
    pixel_space = cfg.pixel_space
    out = cfg.out.rstrip("/")
    vae = "pixel_space" if pixel_space else vae_identity(cfg.vae)
    listed = None if cfg.input == MNIST else discover(cfg.input)
    source = _source(cfg, listed[1] if listed else [])
    identity = _identity(cfg, options, source, vae)
    if cfg.dataset_id and identity.digest != cfg.dataset_id:
        raise EncodeError(f"the input {cfg.input} changed since its identity was computed (dataset_id "
                          f"{cfg.dataset_id[:12]}..., now {identity.digest[:12]}...): re-run, or drop dataset_id")
    if (found := _reusable(out, identity)) is not None:
        return (found if int(os.environ.get("RANK", "0")) == 0 else None), True
    with _input_folder(cfg) as folder:
        class_names, files, skipped = listed or discover(folder)
        torch_device = resolve_device(cfg.device or "auto", int(os.environ.get("LOCAL_RANK", "0")))
        shards = [files[i : i + cfg.shard_size] for i in range(0, len(files), cfg.shard_size)]
        job = {"options": asdict(options), "class_names": class_names, "images": len(files),
               "source": source["sha256"], "vae": vae}
        rank, world, created = _dist_setup()
        try:
            if rank == 0:
                _claim_output(out, job)
            _barrier(world)
            encode_shards(out, shards, options, cfg.vae, cfg.dtype, torch_device, rank, world, cfg.batch_size,
                          cfg.workers, cfg.progress)
            _barrier(world)
            if rank != 0:
                return None, False
            if cfg.input != MNIST:
                _check_unchanged(cfg.input, folder, files, out, len(shards))
            return _write_manifest(out, options, class_names, len(shards), skipped, identity), False
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()


def _check_unchanged(input_uri: str, folder: str, files: list[ImageFile], out: str, num_shards: int) -> None:
    """Fail when the input's image files changed since they were listed: the shards would not be what the
    identity says. The finished-shard records are dropped first, so that no later run resumes from them."""
    before = {(f.relative, f.size, f.version) for f in files}
    try:
        now = {(f.relative, f.size, f.version) for f in discover(folder)[1]}
    except EncodeError:
        now = set()
    if now == before:
        return
    changed = sorted({entry[0] for entry in before ^ now})
    for k in range(num_shards):
        storage.delete(sidecar_uri(out, k))
    storage.delete(storage.join(out, ENCODE_JOB))
    raise EncodeError(f"the input {input_uri} changed during encoding ({len(changed)} image files added, removed or "
                      f"rewritten, e.g. {changed[0]!r}): the shards might mix old and new images, so none is kept; "
                      "re-run the encode once the input is settled")


def _claim_output(out: str, job: dict) -> None:
    """Record the job in `out`, or refuse when `out` holds an encoding of other inputs/options."""
    uri = storage.join(out, ENCODE_JOB)
    try:
        previous = json.loads(storage.get_bytes(uri))
    except storage.ObjectNotFound:
        storage.put_bytes(uri, json.dumps(job, indent=1).encode())
        return
    if previous != job:
        changed = sorted(k for k in job if previous.get(k) != job[k])
        raise EncodeError(f"{out} already holds an encoding of other inputs or options (differs in: "
                          f"{', '.join(changed)}); pick another out or delete that one")


def _write_manifest(out: str, options: EncodeOptions, class_names: list[str], num_shards: int,
                    skipped: list[Skipped], identity: DatasetId) -> Manifest:
    sides = [json.loads(storage.get_bytes(sidecar_uri(out, k))) for k in range(num_shards)]
    infos = [ShardInfo.model_validate(s["shard"]) for s in sides]
    images = sum(s["images"] for s in sides)
    if images == 0:
        raise EncodeError(f"no image under the input could be decoded ({len(skipped)} skipped); see the reasons "
                          f"in {storage.join(out, 'shards')}/*.json")
    shape = next(s["shape"] for s in sides if s["images"])
    manifest = Manifest(
        space="pixel" if options.pixel_space else "latent",
        count=sum(i.count for i in infos), images=images, channels=shape[0], resolution=options.resolution,
        shape=tuple(shape), dtype="uint8" if options.pixel_space else "float16",
        scale_factor=1.0 if options.pixel_space else next(s["scale_factor"] for s in sides if "scale_factor" in s),
        vae=options.vae, class_names=class_names, flip=options.flip, shard_size=options.shard_size,
        shards=infos, skipped=skipped + [Skipped.model_validate(x) for s in sides for x in s["skipped"]],
        identity=identity)
    write_manifest(out, manifest)
    return manifest

"""Generation: N images from a checkpoint or a registered model, seeded per image, over torchrun ranks.

Image i uses seed `seed + i` (grid: `seed + column`) and its class label; its noise comes from its
own generator (`diffusion.SeededNoise`), so image i is the same whatever the batch size or the
number of ranks. Rank r generates batches r, r + W, r + 2W, ... (W ranks, `rank_indices`); PNGs are written by
index from every rank, the npz is gathered on rank 0 in index order.

What to sample from (a checkpoint or a registered model) is `maskdit.evaluation.sources`. The step is
`run(SampleConfig) -> SampleResult`: a grid PNG, or a folder of PNGs and/or one npz, plus its
result.json.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from maskdit.core.config import StrictModel
from maskdit.core.result import StepResult, result_uri
from maskdit.evaluation.sources import Decoder, SampleError, load_sampler_source
from maskdit.method.diffusion import SamplerConfig

# ------------------------------------------------------------------------------------------
# Labels, seeds, ranks
# ------------------------------------------------------------------------------------------


def random_labels(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Uniform class labels (n,) long: a function of (n, num_classes, seed) alone, the same on every rank."""
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def grid_plan(classes: Sequence[int], n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Labels and seeds of a class grid: row r = class classes[r], column j = seed `seed + j`."""
    labels = torch.tensor([c for c in classes for _ in range(n_per_class)], dtype=torch.long)  # (R * K,)
    seeds = [seed + j for _ in classes for j in range(n_per_class)]
    return labels, seeds


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise SampleError(f"class {int(bad[0])} is outside 0..{num_classes - 1} (the model has {num_classes} classes)")


def rank_indices(n: int, rank: int, world_size: int, batch_size: int = 1) -> list[int]:
    """The share of indices 0..n-1 that rank `rank` of `world_size` generates: whole batches, strided.

    Batch b holds indices b*batch_size .. (b+1)*batch_size - 1 and goes to rank b mod world_size, so an
    image always shares its forward passes with the same images whatever the number of ranks: its
    pixels and its Inception features are the same bits for 1 or 8 ranks. A rank past the last
    batch (more ranks than batches) gets nothing.
    """
    return [i for b in range(rank, -(-n // batch_size), world_size)
            for i in range(b * batch_size, min((b + 1) * batch_size, n))]


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


def generate_batches(precond, decode: Decoder, class_labels: torch.Tensor, seeds: Sequence[int],
                     sampler: SamplerConfig, batch_size: int = 64, progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield uint8 images (B, H, W, 3) on the CPU, `batch_size` at a time, in the order of `seeds`."""
    from tqdm import tqdm

    from maskdit.method.diffusion import sample_latents

    if len(seeds) != len(class_labels):
        raise SampleError(f"got {len(seeds)} seeds for {len(class_labels)} labels; pass one seed per image")
    check_labels(class_labels, precond.config.num_classes)
    with tqdm(total=len(seeds), disable=not progress, desc="sampling", unit="img") as bar:
        for start in range(0, len(seeds), batch_size):
            labels = class_labels[start:start + batch_size]
            x0 = sample_latents(precond, labels, list(seeds[start:start + batch_size]),
                                **sampler.sampler_kwargs())  # (B, C, h, w)
            if not torch.isfinite(x0).all():  # a diverged or altered model: a black image would hide it
                raise SampleError(f"the model's output for seeds {list(seeds[start:start + batch_size])[:4]} holds NaN "
                                  "or inf; no image written: its weights are broken, sample another checkpoint")
            images = decode(x0).cpu()  # (B, H, W, 3) uint8
            bar.update(len(images))
            yield images


def generate(precond, decoder: Decoder, class_labels: torch.Tensor, seeds: Sequence[int], sampler: SamplerConfig,
             batch_size: int = 64, device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W, 3) for class_labels (N,) and seeds (N,) with the EDM Heun sampler and CFG."""
    if device is not None:
        precond = precond.to(device)
    if len(seeds) == 0:
        raise SampleError("nothing to generate: 0 seeds")
    batches = generate_batches(precond, decoder, torch.as_tensor(class_labels, dtype=torch.long), seeds,
                               sampler, batch_size, progress)
    return torch.cat(list(batches))


# ------------------------------------------------------------------------------------------
# Output: PNGs, npz, grid
# ------------------------------------------------------------------------------------------


def png_bytes(image: np.ndarray | torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_grid(images: np.ndarray | torch.Tensor, rows: int, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) laid out row-major in `rows` rows -> one uint8 (rows*(H+pad)+pad, ..., 3) picture."""
    images = np.asarray(images, dtype=np.uint8)
    n, h, w, c = images.shape
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = image
    return grid


def upscale(images: np.ndarray, min_side: int = 64) -> np.ndarray:
    """Nearest-neighbour enlargement of tiny images (MNIST 32 px) so the grid is viewable."""
    factor = max(1, math.ceil(min_side / images.shape[1]))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def save_grid(images: np.ndarray | torch.Tensor, rows: int, uri: str) -> None:
    from maskdit.core import storage

    storage.put_bytes(uri, png_bytes(make_grid(upscale(np.asarray(images)), rows)))


def npz_bytes(images: np.ndarray, labels: np.ndarray, seeds: np.ndarray) -> bytes:
    """ADM's sample layout: arr_0 uint8 (N, H, W, 3), arr_1 labels (N,); plus seeds (N,)."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels, seeds=seeds)
    return buffer.getvalue()


def load_samples_npz(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), labels (N,)) from an npz written by `maskdit sample --npz` (or ADM)."""
    from maskdit.core import storage

    with np.load(io.BytesIO(storage.get_bytes(uri)), allow_pickle=False) as npz:
        if "arr_0" not in npz:
            raise SampleError(f"{uri} has keys {sorted(npz.files)}; expected arr_0 (uint8 images N x H x W x 3)")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz else np.full(len(images), -1)
    return images, labels


@dataclass
class RankSamples:
    indices: list[int]  # the indices this rank generated
    images: torch.Tensor | None  # all N images on rank 0 when gathered (npz), else None
    files: list[str]  # URIs written by this rank


def sample_to(source, out: str, class_labels: torch.Tensor, seeds: Sequence[int], sampler: SamplerConfig,
              batch_size: int, png: bool = True, npz: bool = False, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> RankSamples:
    """Generate this rank's share of the images; PNGs `<out>/<index:06d>.png`, npz `<out>/samples.npz`."""
    from maskdit.core import storage

    idx = rank_indices(len(seeds), rank, world_size, batch_size)
    labels = class_labels[idx]
    my_seeds = [seeds[i] for i in idx]
    files: list[str] = []
    kept: list[torch.Tensor] = []
    done = 0
    for images in generate_batches(source.precond, source.decode, labels, my_seeds, sampler, batch_size,
                                   progress=progress and rank == 0):
        if png:
            for i, image in zip(idx[done:done + len(images)], images):
                files.append(storage.join(out, f"{i:06d}.png"))
                storage.put_bytes(files[-1], png_bytes(image.numpy()))
        if npz:
            kept.append(images)
        done += len(images)
    gathered = None
    if npz:
        mine = torch.cat(kept) if kept else torch.empty(0, dtype=torch.uint8)
        gathered = gather_by_index(mine, idx, len(seeds), rank, world_size)
        if rank == 0:
            uri = storage.join(out, "samples.npz")
            storage.put_bytes(uri, npz_bytes(gathered.numpy(), class_labels.numpy(), np.asarray(seeds)))
            files.append(uri)
    return RankSamples(idx, gathered, files)


def gather_by_index(mine: torch.Tensor, indices: list[int], n: int, rank: int, world_size: int) -> torch.Tensor | None:
    """Rows of every rank placed at their indices, on rank 0 (None elsewhere); local when one process."""
    if world_size == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * world_size if rank == 0 else None
    dist.gather_object((indices, mine.cpu()), parts, dst=0)
    if rank != 0:
        return None
    full = torch.empty((n, *mine.shape[1:]), dtype=mine.dtype)
    for part_indices, rows in parts:
        full[part_indices] = rows
    return full


# ------------------------------------------------------------------------------------------
# The sample step
# ------------------------------------------------------------------------------------------


class SampleConfig(StrictModel):
    """`maskdit sample`: images from a checkpoint or a registered model (EDM Heun sampler with CFG)."""

    checkpoint: str = Field(description="checkpoint file or folder (path or s3:// URI), or models:/<name>@<alias>")
    out: str = Field(description="grid PNG (ends in .png: rows of classes, columns of seeds), or a folder "
                                 "(path or URI) for <index>.png files and/or samples.npz")
    classes: list[int] | None = None  # rows of the grid / classes to draw; None: the first 8 (grid) or all
    n_per_class: int = Field(8, ge=1, description="images per class (grid columns)")
    num_images: int | None = Field(None, ge=1, description="N images with uniform random classes (not with classes)")
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0  # image i uses seed + i (grid: seed + column)
    batch_size: int = Field(64, ge=1, description="images per forward pass, per rank")
    dataset: str | None = None  # manifest naming the decoder; None: the checkpoint's train_config.data.uri
    png: bool = True  # folder output: one PNG per image
    npz: bool = False  # folder output: one samples.npz (arr_0 images, arr_1 labels, seeds)
    device: str = "auto"  # auto (the local rank's GPU, else CPU), cpu or cuda
    progress: bool = True


class SampleResult(StepResult):
    kind: Literal["sample"] = "sample"
    out: str  # the grid PNG or the folder
    images: int
    checkpoint: str  # what was sampled (a checkpoint URI or models:/ URI)
    sampler: SamplerConfig
    seed: int


def run(cfg: SampleConfig) -> SampleResult | None:
    """Generate as configured; the result (also `result.json`) on rank 0, None on the others."""
    from maskdit.core import distributed, storage

    if cfg.classes and cfg.num_images:
        raise SampleError("give classes (with n_per_class) or num_images (random classes), not both")
    grid = cfg.out.endswith(".png")
    info = distributed.setup(cfg.device)
    try:
        if info.is_main:  # every location is checked before the first sample
            storage.check_writable(cfg.out if grid else storage.join(cfg.out, "result.json"), "output (out)")
        source = load_sampler_source(cfg.checkpoint, info.device, cfg.dataset)
        num_classes = source.config.num_classes
        if grid:
            rows = cfg.classes or list(range(min(8, num_classes)))
            labels, seeds = grid_plan(rows, cfg.n_per_class, cfg.seed)
        elif cfg.num_images:
            labels = random_labels(cfg.num_images, num_classes, cfg.seed)
            seeds = [cfg.seed + i for i in range(cfg.num_images)]
        else:
            labels, seeds = grid_plan(cfg.classes or list(range(num_classes)), cfg.n_per_class, cfg.seed)
        check_labels(labels, num_classes)
        if grid:
            if info.is_main:
                images = generate(source.precond, source.decode, labels, seeds, cfg.sampler, cfg.batch_size,
                                  progress=cfg.progress)  # (R * K, H, W, 3)
                save_grid(images, len(rows), cfg.out)
        else:
            sample_to(source, cfg.out, labels, seeds, cfg.sampler, cfg.batch_size, png=cfg.png, npz=cfg.npz,
                      rank=info.rank, world_size=info.world_size, progress=cfg.progress)
        if not info.is_main:
            return None
        result = SampleResult(out=cfg.out, images=len(seeds), checkpoint=source.meta.get("uri", cfg.checkpoint),
                              sampler=cfg.sampler, seed=cfg.seed)
        result.write(result_uri(cfg.out, is_file=grid))
        return result
    finally:
        distributed.teardown()

"""Generation: N images from a checkpoint or a registered model, seeded per image, over torchrun ranks.

Image i uses seed `seed + i` (grid: `seed + column`) and its class label; its noise comes from its
own generator (`diffusion.SeededNoise`), so image i is the same whatever the batch size or the
number of ranks. Rank r generates indices r, r + W, r + 2W, ... (W ranks); PNGs are written by
index from every rank, the npz is gathered on rank 0 in index order.

Sources (`load_sampler_source`):
- a checkpoint file or folder URI (its EMA weights, `checkpoint.load_ema_model`), decoded with
  the VAE named by a dataset manifest (`--dataset`, else the checkpoint's `train_config.data.uri`);
- `models:/<name>@<alias>` or `models:/<name>/<version>`: the MLflow pyfunc model of
  `maskdit.registry`, which carries its EMA weights and its manifest.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskdit.errors import UserError

Decoder = Callable[[torch.Tensor], torch.Tensor]  # x0 (B, C, h, w) -> uint8 images (B, H, W, 3)


class SampleError(UserError, ValueError):
    """Bad sampling input (classes, counts, a model that does not fit its decoder); names the value."""


# ------------------------------------------------------------------------------------------
# Sources: what to sample from
# ------------------------------------------------------------------------------------------


@dataclass
class SamplerSource:
    precond: torch.nn.Module  # EDMPrecond in eval mode
    decode: Decoder
    config: Any  # ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)  # uri, step, dataset, ...


def check_decoder_fits(config, manifest, source: str) -> None:
    """The model's x0 must be what the manifest's decoder takes, and its classes the dataset's."""
    model_shape = (config.in_channels, config.input_size, config.input_size)
    if tuple(manifest.shape) != model_shape:
        raise SampleError(f"{source}: the model makes x0 of shape {model_shape} but the dataset manifest's "
                          f"decoder takes {tuple(manifest.shape)} ({manifest.space} space); pass the --dataset "
                          "the model was trained on")
    if manifest.num_classes != config.num_classes:
        raise SampleError(f"{source}: the model has {config.num_classes} classes, the dataset "
                          f"{manifest.num_classes}; pass the --dataset the model was trained on")


def load_sampler_source(uri: str, device: torch.device | str = "cpu", dataset: str | None = None) -> SamplerSource:
    """EMA model + decoder from a checkpoint URI (file or folder) or an MLflow `models:/` URI."""
    if str(uri).startswith("models:/"):
        return _registered_source(uri, device)
    from maskdit.checkpoint import load_ema_model
    from maskdit.shards import load_decoder, read_manifest

    precond, config, meta = load_ema_model(uri, device)
    dataset = dataset or ((meta.get("train_config") or {}).get("data") or {}).get("uri")
    if not dataset:
        raise SampleError(f"checkpoint {meta.get('uri', uri)} names no dataset (train_config.data.uri); pass "
                          "--dataset, the dataset whose manifest names the VAE (or pixel space)")
    manifest = read_manifest(dataset)
    check_decoder_fits(config, manifest, f"checkpoint {meta.get('uri', uri)}")
    return SamplerSource(precond, load_decoder(manifest, device), config, {**meta, "dataset": dataset})


def _registered_source(uri: str, device: torch.device | str) -> SamplerSource:
    """A `models:/` URI through `maskdit.registry`'s pyfunc model (its weights and its manifest)."""
    import mlflow

    from maskdit import registry

    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except mlflow.exceptions.MlflowException as error:
        raise SampleError(f"cannot load {uri} from the MLflow registry: {error}") from None
    if not isinstance(model, registry.MaskDiTModel):
        raise SampleError(f"{uri} is a {type(model).__name__}, not a maskdit model (maskdit.registry.MaskDiTModel)")
    precond = model.precond.to(device)
    return SamplerSource(precond, model.decode, model.model_config, {"uri": uri})


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


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The strided share of indices 0..n-1 that rank `rank` of `world_size` generates."""
    return list(range(rank, n, world_size))


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


def generate_batches(precond, decode: Decoder, class_labels: torch.Tensor, seeds: Sequence[int],
                     cfg_scale: float = 1.5, num_steps: int = 40, batch_size: int = 64,
                     progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield uint8 images (B, H, W, 3) on the CPU, `batch_size` at a time, in the order of `seeds`."""
    from tqdm import tqdm

    from maskdit.diffusion import sample_latents

    if len(seeds) != len(class_labels):
        raise SampleError(f"got {len(seeds)} seeds for {len(class_labels)} labels; pass one seed per image")
    check_labels(class_labels, precond.config.num_classes)
    with tqdm(total=len(seeds), disable=not progress, desc="sampling", unit="img") as bar:
        for start in range(0, len(seeds), batch_size):
            labels = class_labels[start:start + batch_size]
            x0 = sample_latents(precond, labels, list(seeds[start:start + batch_size]),
                                cfg_scale=cfg_scale, num_steps=num_steps)  # (B, C, h, w)
            images = decode(x0).cpu()  # (B, H, W, 3) uint8
            bar.update(len(images))
            yield images


def generate(precond, decoder: Decoder, class_labels: torch.Tensor, seeds: Sequence[int], cfg_scale: float = 1.5,
             num_steps: int = 40, batch_size: int = 64, device: torch.device | str | None = None,
             progress: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W, 3) for class_labels (N,) and seeds (N,) with the EDM Heun sampler and CFG."""
    if device is not None:
        precond = precond.to(device)
    if len(seeds) == 0:
        raise SampleError("nothing to generate: 0 seeds")
    batches = generate_batches(precond, decoder, torch.as_tensor(class_labels, dtype=torch.long), seeds,
                               cfg_scale, num_steps, batch_size, progress)
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
    from maskdit import storage

    storage.put_bytes(uri, png_bytes(make_grid(upscale(np.asarray(images)), rows)))


def npz_bytes(images: np.ndarray, labels: np.ndarray, seeds: np.ndarray) -> bytes:
    """ADM's sample layout: arr_0 uint8 (N, H, W, 3), arr_1 labels (N,); plus seeds (N,)."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels, seeds=seeds)
    return buffer.getvalue()


def load_samples_npz(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), labels (N,)) from an npz written by `maskdit sample --npz` (or ADM)."""
    from maskdit import storage

    with np.load(io.BytesIO(storage.get_bytes(uri)), allow_pickle=False) as npz:
        if "arr_0" not in npz:
            raise SampleError(f"{uri} has keys {sorted(npz.files)}; expected arr_0 (uint8 images N x H x W x 3)")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz else np.full(len(images), -1)
    return images, labels


@dataclass
class SampleResult:
    indices: list[int]  # the indices this rank generated
    images: torch.Tensor | None  # all N images on rank 0 when gathered (npz), else None
    files: list[str]  # URIs written by this rank


def sample_to(source: SamplerSource, out: str, class_labels: torch.Tensor, seeds: Sequence[int],
              cfg_scale: float, num_steps: int, batch_size: int, png: bool = True, npz: bool = False,
              rank: int = 0, world_size: int = 1, progress: bool = True) -> SampleResult:
    """Generate this rank's share of the images; PNGs `<out>/<index:06d>.png`, npz `<out>/samples.npz`."""
    from maskdit import storage

    idx = rank_indices(len(seeds), rank, world_size)
    labels = class_labels[idx]
    my_seeds = [seeds[i] for i in idx]
    files: list[str] = []
    kept: list[torch.Tensor] = []
    done = 0
    for images in generate_batches(source.precond, source.decode, labels, my_seeds, cfg_scale, num_steps,
                                   batch_size, progress=progress and rank == 0):
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
    return SampleResult(idx, gathered, files)


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

"""One rank's share of `maskdit encode`: its shards through the VAE (or kept as pixels), each written with a sidecar.

    images/<class>/<file>  --ADM crop, [-1, 1]-->  VAE encoder  -->  mean, logvar (float16)

Rank r of W encodes shards r, r + W, r + 2W, ...; a shard is written atomically, then its sidecar
`shard-N.json` with its sha256, so a re-run skips every shard whose sidecar exists and whose bytes
still match it.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from maskdit.core import storage
from maskdit.data.imagefolders import ImageFile
from maskdit.data.images import BadImage, load_image, to_tensor
from maskdit.data.shards import Skipped, shard_name, shard_uri, write_shard
from maskdit.data.vae import DEFAULT_VAE, load_vae


@dataclass(frozen=True)
class EncodeOptions:
    vae: str | None = DEFAULT_VAE  # None in pixel space
    resolution: int = 256
    shard_size: int = 4096
    flip: bool = False
    pixel_space: bool = False
    grayscale: bool = False
    dtype: str | None = None  # the encoder's precision (None in pixel space)


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


@torch.no_grad()
def vae_moments(vae, x: torch.Tensor, autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of q(z | x), each (B, C, h, w) float32; reduced precision falls back to float32
    for a batch whose moments are not finite."""
    device = next(vae.parameters()).device
    x = x.to(device)
    if autocast is not None:
        with torch.autocast(device.type, dtype=autocast):
            dist = vae.encode(x).latent_dist
        mean, logvar = dist.mean.float(), dist.logvar.float()
        if torch.isfinite(mean).all() and torch.isfinite(logvar).all():
            return mean, logvar
    dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.logvar.float()


def sidecar_uri(out: str, index: int) -> str:
    return shard_uri(out, shard_name(index).replace(".safetensors", ".json"))


def _shard_done(out: str, index: int) -> bool:
    """Whether shard `index` and its sidecar exist and the shard still matches the sidecar's sha256."""
    try:
        side = json.loads(storage.get_bytes(sidecar_uri(out, index)))
        data = storage.get_bytes(shard_uri(out, shard_name(index)))
    except storage.ObjectNotFound:
        return False
    return hashlib.sha256(data).hexdigest() == side["shard"]["sha256"]


def _read_one(item: ImageFile, options: EncodeOptions) -> np.ndarray | Skipped:
    try:
        return load_image(storage.get_bytes(item.uri), options.resolution, options.grayscale)
    except BadImage as error:
        return Skipped(path=item.uri, reason=str(error))


def _encode_shard(files: list[ImageFile], options: EncodeOptions, vae, autocast, batch_size: int,
                  pool: ThreadPoolExecutor, progress) -> tuple[dict[str, torch.Tensor], list[Skipped]]:
    """Tensors of one shard: originals first, then (with `flip`) their mirrored copies."""
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    pending: list[Future] = [pool.submit(_read_one, f, options) for f in batches[0]] if batches else []
    outputs: dict[str, list[torch.Tensor]] = {}
    labels: list[int] = []
    skipped: list[Skipped] = []
    for b, batch in enumerate(batches):
        results = [future.result() for future in pending]
        if b + 1 < len(batches):  # decode the next batch while this one runs through the VAE
            pending = [pool.submit(_read_one, f, options) for f in batches[b + 1]]
        arrays = [r for r in results if isinstance(r, np.ndarray)]
        skipped += [r for r in results if isinstance(r, Skipped)]
        labels += [f.label for f, r in zip(batch, results) if isinstance(r, np.ndarray)]
        if progress is not None:
            progress.update(len(batch))
        if not arrays:
            continue
        views = {"": np.stack(arrays)}  # (B, H, W, C) uint8
        if options.flip:
            views["flip"] = views[""][:, :, ::-1]
        for view, images in views.items():
            if options.pixel_space:
                outputs.setdefault(f"pixels{view}", []).append(torch.from_numpy(images.copy()).permute(0, 3, 1, 2))
            else:
                mean, logvar = vae_moments(vae, to_tensor(images), autocast)
                outputs.setdefault(f"mean{view}", []).append(mean.half().cpu())
                outputs.setdefault(f"logvar{view}", []).append(logvar.half().cpu())
    names = ["pixels"] if options.pixel_space else ["mean", "logvar"]
    tensors = {}
    for name in names:
        parts = outputs.get(name, []) + outputs.get(f"{name}flip", [])
        tensors[name] = torch.cat(parts).contiguous() if parts else torch.empty(0)
    tensors["labels"] = torch.tensor(labels * (2 if options.flip else 1), dtype=torch.int64)
    return tensors, skipped


def encode_shards(out: str, shards: list[list[ImageFile]], options: EncodeOptions, vae: str, dtype: str,
                  torch_device: torch.device, rank: int, world: int, batch_size: int, workers: int,
                  progress: bool) -> None:
    """This rank's shards (r, r + W, ...), each written with its sidecar; finished ones are skipped.

    `vae` and `dtype` are the encoder and its precision (unused in pixel space), `progress` a bar on rank 0.
    """
    pixel_space = options.pixel_space
    model = None if pixel_space else load_vae(vae, torch_device)
    autocast = None if pixel_space else _autocast_dtype(dtype, torch_device)
    mine = list(range(rank, len(shards), world))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(shards[k]) for k in mine), unit="img",
                   desc=f"encode (rank 0 of {world})" if world > 1 else "encode")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k in mine:
            if _shard_done(out, k):
                if bar is not None:
                    bar.update(len(shards[k]))
                continue
            tensors, bad = _encode_shard(shards[k], options, model, autocast, batch_size, pool, bar)
            info = write_shard(out, k, tensors)
            side = {"shard": info.model_dump(), "images": len(shards[k]) - len(bad),
                    "shape": list(tensors["pixels" if pixel_space else "mean"].shape[1:]),
                    "skipped": [s.model_dump() for s in bad]}
            if model is not None:
                side["scale_factor"] = float(model.config.scaling_factor)
            storage.put_bytes(sidecar_uri(out, k), json.dumps(side).encode())
    if bar is not None:
        bar.close()


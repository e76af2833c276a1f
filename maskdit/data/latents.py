"""The dataset the trainer sees: `LatentSet` over memory-mapped shards, and `load_dataset` that makes one."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from maskdit.data.decode import load_decoder
from maskdit.data.nodecache import mapped_shards
from maskdit.data.shards import Manifest, ShardError, dataset_root, read_manifest


def load_dataset(uri: str, verify: bool = True, cache_dir: str | os.PathLike | None = None) -> LatentSet:
    """The encoded dataset at `uri`, fetched once per node, checksummed, memory-mapped.

    Under torchrun the processes of a node serialise on a file lock in the cache: the first
    downloads and verifies, the others then find verified copies and only map them
    (maskdit.data.nodecache).
    """
    root = dataset_root(uri)
    manifest = read_manifest(root)
    return LatentSet(manifest, mapped_shards(root, manifest, verify, cache_dir))


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


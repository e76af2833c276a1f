"""Watching a training run: sample grids and a quick FID of the EMA weights, logged to MLflow at their step.

Only a tracked run is watched (rank 0 has an MLflow run); the trainer calls `Monitor.after_step`
on every step, which returns at once on the steps where nothing is due (two integer tests).

- Grid (every `grid_every` steps and at the end; rank 0 alone): rows of classes, columns of fixed
  seeds, sampled from the EMA weights and decoded to pixels, so grids of different steps show the
  same noise. Logged with `mlflow.log_image(key="samples", step=...)` (the UI's step slider) and
  written as PNG to `<checkpoint.dir>/monitor/grid-<step>.png`, which TrainResult.grid names.
- Quick FID (every `fid_every` steps and at the end; all ranks): image i of `fid_samples` has seed
  `seed + i` and a seeded random class, so every FID of the run scores the same noise. Rank r
  samples and embeds images r, r + W, ... (no rank waits for another's sampling), rank 0 gathers
  the pool3 features in index order and logs metric `fid_quick` at that step. The reference is
  `ref_stats`, else the dataset's own statistics over `ref_samples` images (posterior means,
  decoded), computed once by all ranks and cached in `<checkpoint.dir>/monitor/ref_stats.npz`.
  1 rank and N ranks score the same images; the FIDs agree to float rounding (batches differ).

While rank 0 draws the grid or computes the Frechet distance, the other ranks go on to the next
step and wait in its all-reduce; nothing else waits. A signal that arrives meanwhile is seen at
the next step, so keep a quick FID shorter than checkpoint.grace_period_s on preemptible nodes.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from maskdit.core import distributed, storage, tracking
from maskdit.core.distributed import DistInfo
from maskdit.core.errors import ServiceUnavailable, UserError
from maskdit.data.decode import load_decoder
from maskdit.data.latents import LatentSet
from maskdit.train.config import TrainConfig

log = logging.getLogger(__name__)
GRID_KEY = "samples"  # the MLflow image key of the grids
FID_METRIC = "fid_quick"


class MonitorError(UserError, ValueError):
    """A monitor setting that cannot work with this model or data; the message says what to set."""


class Monitor:
    """Grids and quick FIDs of `ema` during a run; `active` only when the run is tracked (the same on all ranks)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, data: LatentSet, ema: torch.nn.Module, active: bool):
        self.cfg, self.mon, self.dist, self.data, self.ema = cfg, cfg.monitor, dist, data, ema
        self.grid_every, self.fid_every = self.mon.every(cfg.steps) if active else (0, 0)
        self.classes = self.mon.grid_classes or list(range(min(8, data.num_classes)))
        self.grid: str | None = None  # URI of the last grid written
        self.fid: float | None = None  # the last quick FID
        self.seconds = {"grid": 0.0, "fid": 0.0, "ref_stats": 0.0}  # time spent, all ranks' view of rank 0
        self._inception = None
        self._ref = None
        self.decode = None
        bad = [c for c in self.classes if not 0 <= c < data.num_classes]
        if bad:
            raise MonitorError(f"monitor.grid_classes has {bad}, outside 0..{data.num_classes - 1} of the dataset; "
                               "fix the list or leave it unset (the first 8 classes)")
        if (self.grid_every or self.fid_every) and data.manifest.space == "latent" and not data.manifest.vae:
            if dist.is_main:
                log.warning("the dataset %s names no VAE: its samples cannot be decoded, so this run logs no "
                            "sample grids and no quick FID", cfg.data.uri)
            self.grid_every = self.fid_every = 0
        if not (self.grid_every or self.fid_every):
            return
        ema.eval()
        if self.fid_every or dist.is_main:  # a VAE that does not load stops the run now, not at its first grid
            try:
                self.decode = load_decoder(data.manifest, dist.device)
            except ServiceUnavailable:  # the store or registry is down: transient, not a bad VAE
                raise
            except UserError as error:
                raise MonitorError(f"{error}\nOr turn training-time samples off: monitor.grid_every=0 "
                                   "monitor.fid_samples=0") from None
        if self.fid_every and dist.is_main and self.mon.ref_stats:
            from maskdit.evaluation import fid

            self._ref = fid.load_stats(self.mon.ref_stats)  # a wrong path fails before the first step

    def due(self, step: int, last: bool) -> tuple[bool, bool]:
        """(grid, FID) due after `step` steps?"""
        return (bool(self.grid_every) and (last or step % self.grid_every == 0),
                bool(self.fid_every) and (last or step % self.fid_every == 0))

    def after_step(self, step: int, last: bool) -> dict[str, float]:
        """Grid and/or FID when due after `step` steps (collective for the FID: call on every rank)."""
        grid, fid = self.due(step, last)
        if not (grid or fid):
            return {}
        out = {}
        if fid:
            start = time.perf_counter()
            value = self.quick_fid()
            if value is not None:
                self.fid = out[FID_METRIC] = value
                out["fid_quick_s"] = time.perf_counter() - start
                self.seconds["fid"] += out["fid_quick_s"]
                tracking.log_metrics(out, step=step)
                log.info("step %d: quick FID %.3f (%d samples, %.1f s)", step, value, self.mon.fid_samples,
                         out["fid_quick_s"])
        if grid and self.dist.is_main:
            start = time.perf_counter()
            self.grid = self.sample_grid(step)
            self.seconds["grid"] += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ grid

    def grid_images(self) -> torch.Tensor:
        """uint8 (rows * columns, H, W, 3): the fixed grid of the EMA weights."""
        from maskdit.evaluation.sample import generate, grid_plan

        labels, seeds = grid_plan(self.classes, self.mon.grid_columns, self.mon.seed)
        return generate(self.ema, self.decode, labels, seeds, self.mon.sampler, self.mon.batch_size)

    def sample_grid(self, step: int) -> str:
        """Sample, write `<checkpoint.dir>/monitor/grid-<step>.png`, log it at `step`; return its URI."""
        from maskdit.evaluation.sample import make_grid, png_bytes, upscale

        picture = make_grid(upscale(self.grid_images().numpy()), len(self.classes))  # (H', W', 3) uint8
        uri = storage.join(self.cfg.checkpoint.dir, "monitor", f"grid-{step:09d}.png")
        storage.put_bytes(uri, png_bytes(picture))
        tracking.log_image_at_step(picture, GRID_KEY, step)
        return uri

    # ------------------------------------------------------------------ FID

    def inception(self):
        if self._inception is None:
            from maskdit.evaluation.inception import InceptionFeatures

            self._inception = InceptionFeatures(self.mon.inception, self.dist.device)
        return self._inception

    def _gather(self, feats: np.ndarray, idx: list[int], n: int) -> np.ndarray | None:
        from maskdit.evaluation.evaluate import gather_rows

        return gather_rows(feats.astype(np.float32), idx, n, self.dist.world_size)

    def quick_fid(self) -> float | None:
        """FID of `fid_samples` EMA samples against the reference, on rank 0 (None on the others)."""
        from maskdit.evaluation import fid
        from maskdit.evaluation.sample import (
            generate_batches,
            random_labels,
            rank_indices,
        )

        ref = self.reference()
        n = self.mon.fid_samples
        labels = random_labels(n, self.data.num_classes, self.mon.seed)  # (n,)
        idx = rank_indices(n, self.dist.rank, self.dist.world_size)
        batches = generate_batches(self.ema, self.decode, labels[idx], [self.mon.seed + i for i in idx],
                                   self.mon.sampler, self.mon.batch_size)
        feats = self._gather(self.inception().features(batches), idx, n)  # (n, 2048) on rank 0
        if not self.dist.is_main:
            return None
        return fid.fid_from_features(feats, ref)  # an n x n eigenproblem, not two 2048 x 2048 ones

    def reference(self):
        """The reference statistics on rank 0 (None elsewhere): loaded, cached, or computed by all ranks."""
        from maskdit.evaluation import fid

        if self._ref is not None or (self.mon.ref_stats and not self.dist.is_main):
            return self._ref
        cached = storage.join(self.cfg.checkpoint.dir, "monitor", "ref_stats.npz")
        if distributed.broadcast_object(storage.exists(cached) if self.dist.is_main else None):
            self._ref = fid.load_stats(cached) if self.dist.is_main else None
            return self._ref
        start = time.perf_counter()
        n = min(self.mon.ref_samples, len(self.data))
        chosen = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.mon.seed))[:n]  # (n,)
        idx = list(range(self.dist.rank, n, self.dist.world_size))
        batch = self.mon.batch_size
        batches = (self.decode(self._real_x0(chosen[idx[i:i + batch]])) for i in range(0, len(idx), batch))
        feats = self._gather(self.inception().features(batches), idx, n)
        if self.dist.is_main:
            self._ref = fid.feature_stats(feats)
            fid.save_stats(self._ref, cached)
            self.seconds["ref_stats"] = time.perf_counter() - start
            log.info("reference statistics of %d dataset images in %.1f s: %s", n, self.seconds["ref_stats"], cached)
        return self._ref

    def _real_x0(self, indices: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) of dataset samples without noise: the pixels, or the scaled posterior means."""
        if self.data.manifest.space == "pixel":
            x0 = self.data.draw(indices)
        else:
            x0 = self.data.moments(indices)[0] * self.data.manifest.scale_factor
        return x0.to(self.dist.device)

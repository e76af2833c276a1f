"""Masked pretraining and unmasking tuning: one loop, one process or many under torchrun.

Determinism (what makes resume exact and 1 rank equal N ranks):
- epoch e visits the samples in `randperm(N, seed, e)`; step s takes the global batch
  perm[b B : (b+1) B] (b = s mod steps-per-epoch, the last partial batch dropped); rank r takes
  its contiguous slice of that, in micro batches;
- every random draw of a micro batch (posterior sample z, label dropping, sigma, noise, mask)
  comes from generators seeded by (seed, step, offset of the micro batch in the global batch).
So a checkpoint needs no data iterator state: the step is the data position, and a resumed run
draws exactly what the uninterrupted run would have. With equal micro batches, one rank with
gradient accumulation computes the same samples as N ranks (up to float summation order).

The gradient is the mean over the global batch: each micro loss is sum / per-rank batch, and
DDP averages over ranks.

Preemption (see maskdit/core/elastic.py): SIGTERM or SIGINT sets a flag that every rank adds to the
step's all-reduce, so all ranks stop after the same step; every rank writes its share of that step's checkpoint (rank 0 commits it) and
`train` raises `Interrupted` (exit 143), within checkpoint.grace_period_s of the signal.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch
import yaml

from maskdit.core import distributed, storage, tracking
from maskdit.core.config import ConfigError
from maskdit.core.distributed import DistInfo
from maskdit.core.elastic import StopOnSignal
from maskdit.core.errors import Interrupted, UserError
from maskdit.core.result import StepResult, result_uri
from maskdit.data.latents import LatentSet, load_dataset
from maskdit.data.shards import ShardError, manifest_sha256
from maskdit.method.compiled import training_loss
from maskdit.method.diffusion import EDMPrecond
from maskdit.method.model import MaskDiT
from maskdit.train.config import TrainConfig
from maskdit.train.monitor import Monitor
from maskdit.train.state import TrainState
from maskdit.train.step import (
    BatchPlan,
    Steps,
    build_optimizer,
    distributed_model,
    mixed_precision,
)
from maskdit.train.warmstart import InitSource

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Too many non-finite steps in a row; the message names the step and what to try."""


class TrainResult(StepResult):
    """What `maskdit train` leaves in `checkpoint.dir/result.json` (rank 0) when it has done all its steps."""

    kind: Literal["train"] = "train"
    checkpoint: str | None  # URI of the final checkpoint (None: no step was configured)
    checkpoint_dir: str
    step: int  # optimizer steps done
    metrics: dict[str, float] = {}  # the last logged metrics
    skipped_steps: int = 0
    run_id: str | None = None  # MLflow run, when tracking
    world_size: int = 1
    init_from: InitSource | None = None  # where the weights came from (lineage; kept across resumes)
    resumed_from: str | None = None  # another run's checkpoint this one continued (checkpoint.resume_from)
    tracking_uri: str | None = None  # the MLflow server of run_id (no credentials)
    experiment_id: str | None = None  # run_id's experiment
    grid: str | None = None  # URI of the last sample grid PNG (monitor)
    fid_quick: float | None = None  # the last quick FID (monitor)
    seconds: float = 0.0  # wall time of this call's training loop, the monitor's time left out (max_wall_s)


#################################################################################
#                                 The trainer                                   #
#################################################################################


class Trainer(TrainState, Steps):
    """State of one training run; `run()` is the loop. Built by `train(cfg)`. The step mechanics
    (`train_step`) are in maskdit/train/step.py, the checkpoint side (`save`, the resume) in
    maskdit/train/state.py."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, data: LatentSet | None = None):
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.data = data if data is not None else load_dataset(cfg.data.uri, cfg.data.verify, cfg.data.cache_dir)
        self._check_data()
        self.per_rank, self.micro, self.accum = cfg.batch.split(dist.world_size)
        self.plan = BatchPlan(len(self.data), cfg.batch.global_batch, cfg.seed)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.precond = EDMPrecond(MaskDiT(cfg.model)).to(self.device)
        self.ema = EDMPrecond(MaskDiT(cfg.model)).to(self.device).requires_grad_(False)
        self.ema.load_state_dict(self.precond.state_dict())
        self.params = list(self.precond.parameters())
        self.ema_params = list(self.ema.parameters())
        self.loss_fn = training_loss(self.precond.net, cfg.compile)  # eq. (6)-(8), compiled per cfg.compile
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device)
        self.autocast, self.scaler = mixed_precision(cfg.precision, self.device)
        self.step = 0
        self.skipped = 0
        self.run_id: str | None = None
        self.init_source: InitSource | None = None  # lineage: init_from as resolved
        self.resumed_from: str | None = None  # lineage: the other run's checkpoint we continued
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.monitor: Monitor | None = None
        self.started = time.perf_counter()  # the loop's start (reset when it starts)
        self.watched_s = 0.0  # time the monitor took since then
        self._pending: tuple[tuple[int, int], Future] | None = None  # the micro batch being drawn ahead
        self.stop = StopOnSignal(cfg.checkpoint.grace_period_s)  # installed while run() runs
        self.checkpointer = None  # the background writer (sharded format), made at the first save
        self.restored_uri: str | None = None  # the checkpoint this run resumed from
        self._restore()

        self.model: torch.nn.Module = self.precond
        if dist.distributed:
            self.model = distributed_model(self.precond, cfg, self.device)

    # ----------------------------------------------------------------- setup

    def _check_data(self) -> None:
        shape = (self.cfg.model.in_channels, self.cfg.model.input_size, self.cfg.model.input_size)
        if tuple(self.data.shape) != shape:
            raise ConfigError(
                f"the data at {self.cfg.data.uri} has samples of shape {tuple(self.data.shape)} but the model "
                f"expects {shape} (model.in_channels, model.input_size); fix the model section"
            )
        if self.data.num_classes > self.cfg.model.num_classes:
            raise ConfigError(
                f"the data has {self.data.num_classes} classes but model.num_classes is "
                f"{self.cfg.model.num_classes}; set model.num_classes={self.data.num_classes}"
            )

    # ----------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        if self.step >= cfg.steps:
            final = self.restored_uri if self.step else None
            log.info("nothing to do: step %d of %d already done", self.step, cfg.steps)
            return self._result(final, {})
        params = cfg.model_dump(mode="json")
        tags = {"maskdit.step": "train", "world_size": str(self.dist.world_size)}
        with self.stop, tracking.tracking_run(cfg.tracking.run_name, params, tags=tags,
                                              uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                                              run_id=self.run_id, enabled=main, retry_s=cfg.tracking.retry_s,
                                              flush_s=cfg.tracking.flush_s,
                                              system_metrics=cfg.tracking.system_metrics) as run_id:
            self.run_id = run_id
            if self._lineage():
                tracking.set_tags(self._lineage())
            if run_id is not None:
                self._log_inputs()
            tracked = distributed.broadcast_object(run_id is not None)  # the FID is collective: all ranks agree
            self.monitor = Monitor(cfg, self.dist, self.data, self.ema, active=tracked)
            return self._loop()

    def _lineage(self) -> dict[str, str]:
        """MLflow tags saying where this run's weights came from."""
        tags = self.init_source.tags() if self.init_source else {}
        if self.resumed_from:
            tags["resumed_from"] = self.resumed_from
        return tags

    def _log_inputs(self) -> None:
        """Rank 0, tracked: the resolved config as config.yaml, the dataset as the run's input."""
        cfg, manifest = self.cfg, self.data.manifest
        tracking.log_text(yaml.safe_dump(storage.redact(cfg.model_dump(mode="json")), sort_keys=False),
                          "config.yaml")
        try:
            digest = manifest_sha256(cfg.data.uri)
        except ShardError:  # a LatentSet handed to run() by a test or benchmark: its manifest as JSON
            digest = hashlib.sha256(manifest.model_dump_json(indent=1).encode()).hexdigest()
        identity = {"dataset_id": manifest.identity.digest} if manifest.identity else {}
        tracking.log_dataset(cfg.data.uri, digest[:32], len(self.data), tuple(manifest.shape),
                             manifest_sha256=digest, num_classes=manifest.num_classes, space=manifest.space,
                             resolution=manifest.resolution, images=manifest.images, **identity)
        self.tracking_uri, self.experiment_id = tracking.run_location()

    def _loop(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        consecutive, metrics, final = 0, {}, None
        acc = torch.zeros(3, device=self.device)  # loss, dsm, mae over finite steps since the last log
        norm_sum = torch.zeros((), device=self.device)
        acc_steps, t0, steps_timed = 0, time.perf_counter(), 0
        self.started, self.watched_s = time.perf_counter(), 0.0
        log.info("training steps %d to %d on %d rank(s)", self.step, cfg.steps, self.dist.world_size)
        with ThreadPoolExecutor(max_workers=1) as executor, tqdm(
            total=cfg.steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True,
            mininterval=1.0 if tty else 30.0, desc="train",
        ) as bar:
            while self.step < cfg.steps:
                out = self.train_step(self.step, executor)
                step = self.step
                self.step += 1
                steps_timed += 1
                if out["finite"]:
                    consecutive = 0
                    acc += out["sums"]
                    acc_steps += 1
                    norm_sum += out["grad_norm"]
                else:
                    consecutive += 1
                    self.skipped += 1
                    what = "loss" if out["loss_nonfinite"] else "gradient"
                    log.warning("step %d: non-finite %s, step skipped (%d in a row, %d in all)",
                                step, what, consecutive, self.skipped)
                    if consecutive >= cfg.max_nonfinite_steps:
                        raise NonFiniteError(
                            f"training stopped at step {step}: {consecutive} steps in a row had a non-finite "
                            f"{what} (limit max_nonfinite_steps={cfg.max_nonfinite_steps}); try a lower optim.lr "
                            f"(now {cfg.optim.lr}), precision bf16 or fp32 instead of {cfg.precision}, "
                            "optim.grad_clip (e.g. 1.0), optim.warmup_steps, and check the data for NaN; the "
                            f"last good checkpoint is the newest in {cfg.checkpoint.dir}"
                        )
                last = self.step == cfg.steps or out["out_of_time"]  # max_wall_s ends this call like its last step
                if self.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - t0
                    means = (acc / (acc_steps * cfg.batch.global_batch)).tolist() if acc_steps else [math.nan] * 3
                    metrics = {"loss": means[0], "dsm": means[1], "mae": means[2], "lr": out["lr"],
                               "mask_ratio": out["mask_ratio"], "grad_norm": norm_sum.item() / max(acc_steps, 1),
                               "img_per_s": steps_timed * cfg.batch.global_batch / max(elapsed, 1e-9),
                               "skipped_steps": self.skipped}
                    tracking.log_metrics(metrics, step=self.step)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}",
                                    refresh=False)
                    acc.zero_()
                    norm_sum.zero_()
                    acc_steps, t0, steps_timed = 0, time.perf_counter(), 0
                bar.update(1)
                if self.step % cfg.checkpoint.every == 0 or last or out["stop"]:
                    final = self.save()
                    if last or out["stop"]:  # the run ends: its checkpoint must be complete first
                        self.saved()
                if not out["stop"]:  # stopping: the checkpoint first, the pictures can wait for the next attempt
                    watched = time.perf_counter()
                    self.monitor.after_step(self.step, last)
                    watched = time.perf_counter() - watched
                    t0 += watched  # img_per_s measures training, not the monitor
                    self.watched_s += watched
                if out["stop"] and self.step < cfg.steps:
                    self._stopped(final)
                if out["out_of_time"]:
                    log.info("max_wall_s %.1f s reached after step %d", cfg.max_wall_s, self.step)
                    break
        return self._result(final, metrics)

    def _stopped(self, uri: str) -> None:
        """All ranks agreed to stop after a signal and rank 0 wrote `uri`: wait for it, then raise Interrupted."""
        distributed.barrier()  # the other ranks exit only when rank 0's checkpoint is complete
        since = f" ({self.stop.grace_period_s - self.stop.remaining():.1f} s after it)" if self.stop.requested else ""
        message = (f"stopped on {self.stop.signal_name or 'a signal to another rank'} after step {self.step} of "
                   f"{self.cfg.steps}{since}; checkpoint {uri}; starting again resumes from it")
        raise Interrupted(message)

    def _seconds(self) -> float:
        """Wall time of this call's training loop so far, the monitor's time left out."""
        return time.perf_counter() - self.started - self.watched_s

    def _result(self, final: str | None, metrics: dict[str, float]) -> TrainResult:
        """The run's result, written to `checkpoint.dir/result.json` by rank 0 (what pipeline steps read)."""
        fid_quick = self.monitor.fid if self.monitor else None
        if fid_quick is not None:
            metrics = {**metrics, "fid_quick": fid_quick}
        result = TrainResult(checkpoint=final, checkpoint_dir=self.cfg.checkpoint.dir, step=self.step,
                             metrics=metrics, skipped_steps=self.skipped, run_id=self.run_id,
                             world_size=self.dist.world_size, init_from=self.init_source,
                             resumed_from=self.resumed_from, tracking_uri=self.tracking_uri,
                             experiment_id=self.experiment_id, grid=self.monitor.grid if self.monitor else None,
                             fid_quick=fid_quick, seconds=round(self._seconds(), 3))
        if self.dist.is_main:
            result.write(result_uri(self.cfg.checkpoint.dir))
        return result


def run(cfg: TrainConfig, data: LatentSet | None = None) -> TrainResult:
    """Train (or resume) as configured; under torchrun every rank calls this, rank 0 logs and writes.

    `data` replaces loading `cfg.data.uri` (tests and benchmarks pass a LatentSet they built).
    """
    dist = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, dist, data).run()
    finally:
        distributed.teardown()

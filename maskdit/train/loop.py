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
step's all-reduce, so all ranks stop after the same step; rank 0 writes that step's checkpoint and
`train` raises `Interrupted` (exit 143), within checkpoint.grace_period_s of the signal.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Literal

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from maskdit.core import distributed, storage, tracking
from maskdit.core.config import ConfigError
from maskdit.core.distributed import DistInfo
from maskdit.core.elastic import StopOnSignal
from maskdit.core.errors import Interrupted, UserError
from maskdit.core.result import StepResult, result_uri
from maskdit.data.shards import LatentSet, ShardError, load_dataset, manifest_sha256
from maskdit.method import checkpoint
from maskdit.method.compiled import training_loss
from maskdit.method.diffusion import EDMPrecond, drop_labels, maskdit_loss
from maskdit.method.model import MaskDiT
from maskdit.train import warmstart
from maskdit.train.config import TrainConfig
from maskdit.train.monitor import Monitor
from maskdit.train.warmstart import InitSource

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Too many non-finite steps in a row; the message names the step and what to try."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed after training began (the store went away): retryable, not a UserError.
    A store that is wrong from the start (no such bucket, bad credentials) fails the resume check first."""


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
#                         Seeds, data order, precision                          #
#################################################################################


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed from a tuple of keys (seed, purpose, step, offset): independent streams."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class BatchPlan:
    """Which samples each rank draws at each step (the seeded permutation of every epoch)."""

    def __init__(self, dataset_size: int, global_batch: int, seed: int):
        if dataset_size < global_batch:
            raise ConfigError(
                f"the dataset holds {dataset_size} samples, fewer than batch.global_batch {global_batch}; "
                "lower the batch or encode more data"
            )
        self.dataset_size, self.global_batch, self.seed = dataset_size, global_batch, seed
        self.steps_per_epoch = dataset_size // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> dict[str, int]:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch, "samples_seen": step * self.global_batch,
                "dataset_size": self.dataset_size, "global_batch": self.global_batch}

    def global_indices(self, step: int) -> torch.Tensor:
        """(global_batch,) sample indices of `step`."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.dataset_size, generator=gen)
        return self._perm[batch * self.global_batch : (batch + 1) * self.global_batch]


class _DDP(DistributedDataParallel):
    """DDP that still exposes the wrapped EDMPrecond's `config` (maskdit_loss reads it)."""

    @property
    def config(self):
        return self.module.config


def _precision(name: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler or None) for bf16 | fp16 | tf32 | fp32."""
    tf32 = name in ("bf16", "tf32")  # fp32 leftovers of bf16 autocast may use TF32 too
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if name in ("bf16", "fp16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
    return nullcontext, None


#################################################################################
#                                 The trainer                                   #
#################################################################################


class Trainer:
    """State of one training run; `run()` is the loop. Built by `train(cfg)`."""

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
        fused = cfg.optim.fused if cfg.optim.fused is not None else self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=0.0,
            **({"fused": True} if fused else {"foreach": True}),
        )
        self.autocast, self.scaler = _precision(cfg.precision, self.device)
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
        self._restore()

        self.model: torch.nn.Module = self.precond
        if dist.distributed:
            # mask ratio 0 passes no mask, so the decoder's mask token gets no gradient on those steps
            unused = cfg.model.decoder_depth > 0 and (cfg.mask.schedule != "constant" or cfg.mask.ratio == 0)
            self.model = _DDP(self.precond, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              find_unused_parameters=unused, gradient_as_bucket_view=True)

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

    def _restore(self) -> None:
        """Resume from the newest valid checkpoint in checkpoint.dir, else continue checkpoint.resume_from's,
        else start from init_from, else fresh (maskdit/train/warmstart.py)."""
        cfg = self.cfg
        found, foreign, refused = None, False, None
        if self.dist.is_main:
            try:
                found = checkpoint.load_latest(cfg.checkpoint.dir)
                if found is None and cfg.checkpoint.resume_from:
                    found, foreign = warmstart.resume_state(cfg.checkpoint.resume_from), True
            except UserError as error:  # checkpoints there, none loads (or none to resume): every rank stops
                refused = str(error)
        uri, foreign, refused = distributed.broadcast_object((found[0] if found else None, foreign, refused))
        if refused:
            raise checkpoint.CheckpointError(refused)
        if uri is not None:
            state = found[1] if found else checkpoint.load_checkpoint(uri)
            checkpoint.check_model_config(cfg.model, state, uri)
            self._check_position(state, uri)
            self.precond.net.load_state_dict(state["model"])
            self.ema.net.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and len(state["rng"]["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
            if foreign:  # another run's checkpoint (checkpoint.resume_from): this run is a new MLflow run
                self.resumed_from = uri
            else:
                self.run_id, self.resumed_from = state.get("tracking_run_id"), state.get("resumed_from")
            self.init_source = InitSource(**state["init_from"]) if state.get("init_from") else None
            log.info("resuming from %s at step %d", uri, self.step)
        elif cfg.init_from:
            self.init_source, state = warmstart.start_from(cfg.init_from, cfg.checkpoint.dir,
                                                           tracking.tracking_uri(cfg.tracking.uri), self.dist.is_main)
            warmstart.check_model(cfg.model, state, self.init_source)
            self.precond.net.load_state_dict(state["model"])
            self.ema.net.load_state_dict(state["ema"])
            log.info("initialised model and EMA from %s (%s, step %d); fresh optimizer", cfg.init_from,
                     self.init_source.resolved, state["step"])

    def _check_position(self, state: dict[str, Any], uri: str) -> None:
        theirs = state.get("data_position") or {}
        ours = self.plan.position(0)
        for key in ("dataset_size", "global_batch"):
            if key in theirs and theirs[key] != ours[key]:
                raise ConfigError(
                    f"checkpoint {uri} was trained with {key}={theirs[key]}, this config has {ours[key]}: "
                    "the data order would not continue; keep them, or use another checkpoint.dir "
                    "(with init_from to start from its weights)"
                )

    # ----------------------------------------------------------------- one step

    def _draw(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (B, C, H, W), labels (B,)) of one micro batch, on the CPU (pinned on CUDA)."""
        offset = self.dist.rank * self.per_rank + micro * self.micro  # position in the global batch
        indices = self.plan.global_indices(step)[offset : offset + self.micro]  # (B,)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "data", step, offset))
        x0, labels = self.data.draw(indices, generator=gen), self.data.labels[indices]
        if self.device.type == "cuda":
            x0, labels = x0.pin_memory(), labels.pin_memory()
        return x0, labels

    def _micro_batches(self, executor: ThreadPoolExecutor, step: int):
        """Yield (micro index, x0, labels) of `step`; the next micro batch (of this or the next step)
        is drawn in the executor's thread meanwhile, so the data never waits for the accelerator."""
        for m in range(self.accum):
            key = (step, m)
            if self._pending is None or self._pending[0] != key:
                self._pending = (key, executor.submit(self._draw, *key))
            x0, labels = self._pending[1].result()
            following = (step, m + 1) if m + 1 < self.accum else (step + 1, 0)
            self._pending = (following, executor.submit(self._draw, *following))
            yield m, x0, labels

    def train_step(self, step: int, executor: ThreadPoolExecutor) -> dict[str, Any]:
        """One optimizer step over the global batch (skipped when non-finite); returns what the log needs."""
        cfg, dev = self.cfg, self.device
        mask_ratio = cfg.mask.ratio_at(step, cfg.steps)
        lr = cfg.optim.lr_at(step, cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, device=dev)  # loss, dsm, mae summed over this rank's samples
        for m, x0, labels in self._micro_batches(executor, step):
            offset = self.dist.rank * self.per_rank + m * self.micro
            gen = torch.Generator(dev).manual_seed(derive_seed(cfg.seed, "loss", step, offset))
            x0, labels = x0.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            labels = drop_labels(labels, cfg.p_uncond, cfg.model.num_classes, generator=gen)  # (B,)
            accumulate = self.dist.distributed and m < self.accum - 1  # all-reduce only after the last one
            with self.model.no_sync() if accumulate else nullcontext():
                with self.autocast():
                    out = maskdit_loss(self.model, x0, labels, mask_ratio, cfg.mae_weight, generator=gen,
                                       loss_fn=self.loss_fn)
                loss = out.loss.sum() / self.per_rank  # mean over the global batch after DDP's average
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            sums += torch.stack([out.loss.sum(), out.dsm.sum(), out.mae.sum()]).detach()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip or math.inf, foreach=True)
        stop = torch.full((1,), float(self.stop.requested), device=dev)  # SIGTERM/SIGINT seen on this rank
        out_of_time = cfg.max_wall_s is not None and self._seconds() >= cfg.max_wall_s
        stats = torch.cat([sums, (~torch.isfinite(sums[:1])).float(), (~torch.isfinite(grad_norm)).float()[None],
                           stop, torch.full((1,), float(out_of_time), device=dev)])
        distributed.all_reduce_sum(stats)  # every rank takes the same skip and stop decisions
        loss_bad, grad_bad, stop_asked, wall_up = stats[3:].tolist()  # the step's one host sync
        finite = loss_bad == 0 and grad_bad == 0
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - cfg.ema.decay)
        elif self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        return {"finite": finite, "sums": stats[:3], "grad_norm": grad_norm.detach(), "lr": lr,
                "mask_ratio": mask_ratio, "loss_nonfinite": loss_bad > 0, "stop": stop_asked > 0,
                "out_of_time": wall_up > 0}

    # ----------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "model_config": self.cfg.model.model_dump(),
            "model": self.precond.net.state_dict(),
            "ema": self.ema.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "data_position": self.plan.position(self.step),
            "skipped_steps": self.skipped,
            "tracking_run_id": self.run_id,
            "init_from": self.init_source.model_dump() if self.init_source else None,
            "resumed_from": self.resumed_from,
            "train_config": storage.redact(self.cfg.model_dump(mode="json")),  # no credentials in URIs
        }

    def save(self) -> str:
        """Rank 0 writes ckpt-<step>.pt (atomic) and prunes old ones; returns its URI on every rank."""
        uri = checkpoint.checkpoint_uri(self.cfg.checkpoint.dir, self.step)
        if self.dist.is_main:
            start = time.perf_counter()
            try:
                checkpoint.save_checkpoint(self.cfg.checkpoint.dir, self.state(), self.cfg.checkpoint.keep_last)
            except storage.StorageError as error:
                raise CheckpointWriteError(f"writing the checkpoint of step {self.step} failed: {error}") from None
            log.info("wrote %s in %.1f s", uri, time.perf_counter() - start)
        return uri

    # ----------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        if self.step >= cfg.steps:
            final = checkpoint.checkpoint_uri(cfg.checkpoint.dir, self.step) if self.step else None
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

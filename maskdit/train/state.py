"""The trainer's state on disk: what a checkpoint holds, writing it, and where a run starts.

A run starts from the newest valid checkpoint in its own `checkpoint.dir` (an in-place resume), else
continues `checkpoint.resume_from`'s newest, else warm-starts from `init_from`
(maskdit/train/warmstart.py), else fresh. A checkpoint holds model, EMA, optimizer, scaler, step,
RNG and data position (see maskdit/train/loop.py's determinism contract), so a resume continues
bit-exactly. Writing (`checkpoint.format`): sharded, every rank its share in the background
(maskdit/train/background.py, maskdit/method/sharded.py), rank 0 commits and prunes; or one file that
rank 0 writes while the others wait (`maskdit.method.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch

from maskdit.core import distributed, storage
from maskdit.core.config import ConfigError
from maskdit.core.errors import EXIT_RETRYABLE, ServiceUnavailable, UserError
from maskdit.core.tracking_server import tracking_uri
from maskdit.method import checkpoint
from maskdit.train import warmstart
from maskdit.train.background import BackgroundCheckpointer, CheckpointWriteError
from maskdit.train.warmstart import InitSource

log = logging.getLogger(__name__)
__all__ = ["CheckpointWriteError", "TrainState"]


class TrainState:
    """The checkpoint side of `Trainer` (maskdit/train/loop.py), whose constructor sets what it uses and
    restores: cfg, dist, device, plan, precond, ema, optimizer, scaler, step, skipped, run_id,
    init_source, resumed_from."""

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
                refused = (str(error), error.exit_code)
        uri, foreign, refused = distributed.broadcast_object((found[0] if found else None, foreign, refused))
        if refused:  # a store that stayed down is retryable on every rank, as it was on rank 0
            raise (ServiceUnavailable if refused[1] == EXIT_RETRYABLE else checkpoint.CheckpointError)(refused[0])
        if uri is not None:
            state = found[1] if found else checkpoint.load_checkpoint(uri)
            checkpoint.check_model_config(cfg.model, state, uri)
            self._check_position(state, uri)
            checkpoint.load_weights(self.precond.net, state["model"], uri)
            checkpoint.load_weights(self.ema.net, state["ema"], uri)
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
            self.restored_uri = uri
            log.info("resuming from %s at step %d", uri, self.step)
        elif cfg.init_from:
            self.init_source, state = warmstart.start_from(cfg.init_from, cfg.checkpoint.dir,
                                                           tracking_uri(cfg.tracking.uri), self.dist.is_main)
            warmstart.check_model(cfg.model, state, self.init_source)
            where = f"init_from {cfg.init_from} ({self.init_source.resolved})"
            checkpoint.load_weights(self.precond.net, state["model"], where)
            checkpoint.load_weights(self.ema.net, state["ema"], where)
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

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (`_restore` reads it back)."""
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
        """Start writing this step's checkpoint (sharded: in the background; `saved()` ends it); its URI."""
        ck = self.cfg.checkpoint
        if ck.format == "sharded":
            if self.checkpointer is None:
                self.checkpointer = BackgroundCheckpointer(ck.dir, self.dist.rank, self.dist.world_size, ck.keep_last)
            self.checkpointer.wait()  # the previous upload: its time is known now
            self._check_grace(self.checkpointer.upload_s)
            ckpt_id = distributed.broadcast_object(uuid.uuid4().hex if self.dist.is_main else None)
            state = self.state()
            if self.dist.is_main:
                checkpoint.check_finite(state)
            return self.checkpointer.save(state, ckpt_id)
        uri = checkpoint.checkpoint_uri(ck.dir, self.step, "file")
        if self.dist.is_main:
            start = time.perf_counter()
            try:
                checkpoint.save_checkpoint(self.cfg.checkpoint.dir, self.state(), self.cfg.checkpoint.keep_last)
            except storage.StorageError as error:
                raise CheckpointWriteError(f"writing the checkpoint of step {self.step} failed: {error}") from None
            took = time.perf_counter() - start
            log.info("wrote %s in %.1f s", uri, took)
            self._check_grace(took)
        return uri

    def _check_grace(self, took: float | None) -> None:
        """Rank 0 warns when a checkpoint (staging + upload, or the whole file) took longer than the grace period."""
        if not self.dist.is_main or took is None or took <= self.cfg.checkpoint.grace_period_s:
            return
        log.warning("writing the checkpoint took %.1f s, longer than checkpoint.grace_period_s=%g s: a "
                    "preempted or drained pod would be killed before its checkpoint is complete and lose "
                    "up to checkpoint.every=%d steps; raise the pipeline's grace_period_s (or "
                    "checkpoint.grace_period_s and the pods' terminationGracePeriodSeconds) above %.0f s",
                    took, self.cfg.checkpoint.grace_period_s, self.cfg.checkpoint.every, took)
        if self.checkpointer is not None:
            self.checkpointer.upload_s = None  # warned once for that checkpoint

    def saved(self) -> None:
        """Wait until the checkpoint in flight is committed, on every rank (the last step, a stop)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()
            self._check_grace(self.checkpointer.upload_s)
        distributed.barrier()

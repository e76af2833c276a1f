"""One optimizer step of the trainer: which samples each rank draws (the batch plan), in which precision,
and the step itself (micro batches with gradient accumulation, the non-finite skip, the stop vote).

The determinism these keep is the contract in maskdit/train/loop.py's docstring: the data order is a
function of (seed, epoch), every random draw of a micro batch of (seed, step, offset of the micro
batch in the global batch), so a resumed run and N ranks draw what one uninterrupted rank would.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from maskdit.core import distributed
from maskdit.core.config import ConfigError
from maskdit.method.diffusion import EDMPrecond, drop_labels, maskdit_loss
from maskdit.train.config import OptimConfig, TrainConfig


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


def distributed_model(precond: EDMPrecond, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`precond` wrapped in DDP for a run of several ranks."""
    # mask ratio 0 passes no mask, so the decoder's mask token gets no gradient on those steps
    unused = cfg.model.decoder_depth > 0 and (cfg.mask.schedule != "constant" or cfg.mask.ratio == 0)
    # broadcast_buffers off: the only buffers are the fixed sin-cos position embeddings, equal on every rank
    return _DDP(precond, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused, gradient_as_bucket_view=True, broadcast_buffers=False)


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """The trainer's AdamW (no weight decay): fused on CUDA unless `optim.fused` says otherwise, else foreach.
    benchmarks/ build theirs here too, so that a timing measures the optimizer that trains."""
    fused = optim.fused if optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=0.0,
                             **({"fused": True} if fused else {"foreach": True}))


def mixed_precision(name: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler or None) for bf16 | fp16 | tf32 | fp32."""
    tf32 = name in ("bf16", "tf32")  # fp32 leftovers of bf16 autocast may use TF32 too
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if name in ("bf16", "fp16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
    return nullcontext, None


class Steps:
    """The step mechanics of `Trainer` (maskdit/train/loop.py), whose constructor sets what they use:
    cfg, dist, device, data, plan, per_rank / micro / accum (`cfg.batch.split`), model (DDP-wrapped
    when distributed), loss_fn, params, ema_params, optimizer, autocast, scaler, stop, _pending
    (the micro batch being drawn ahead), and `_seconds()` (the loop's wall time, for max_wall_s)."""

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
        if cfg.optim.grad_clip is None and hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
            # the norm is logged and guarded; clipping at inf would scale every gradient by 1.0, a pass for nothing
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                                      foreach=True)
        else:
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
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - cfg.ema.decay_at(step + 1))
        elif self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        return {"finite": finite, "sums": stats[:3], "grad_norm": grad_norm.detach(), "lr": lr,
                "mask_ratio": mask_ratio, "loss_nonfinite": loss_bad > 0, "stop": stop_asked > 0,
                "out_of_time": wall_up > 0}

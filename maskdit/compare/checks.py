"""What `maskdit compare` refuses before it trains: inputs that cannot answer its question.

- a reference that is the training data itself (FID against digits the model trained on says
  nothing of held-out quality);
- a reference with fewer images than `fid_samples`;
- a budget that gives an evaluation point less training time than one optimizer step takes here
  (measured on one micro batch of the unmasked network, the slower arm).
"""

from __future__ import annotations

import time

import torch

from maskdit.compare.arms import Arm
from maskdit.compare.config import CompareConfig
from maskdit.core import storage
from maskdit.core.config import ConfigError


def check_reference(cfg: CompareConfig) -> None:
    """The reference is held out from `data` and has at least `fid_samples` images."""
    from maskdit.data.shards import dataset_root, read_manifest
    from maskdit.evaluation import fid

    if cfg.reference.endswith(".npz"):
        n = fid.load_stats(cfg.reference).n
    else:
        ref, data = read_manifest(cfg.reference), read_manifest(cfg.data)
        same_id = ref.identity is not None and data.identity is not None and ref.identity.digest == data.identity.digest
        if same_id or dataset_root(cfg.reference) == dataset_root(cfg.data):
            raise ConfigError(f"reference={cfg.reference!r} is the training data itself (data={cfg.data!r}): FID "
                              "against digits the model trained on says nothing of held-out quality; give held-out "
                              "images (e.g. `maskdit data mnist --split heldout`, then `maskdit encode`)")
        n = min(ref.count, cfg.reference_limit or ref.count)
    if n is not None and n < cfg.fid_samples:
        limit = f" (reference_limit={cfg.reference_limit})" if cfg.reference_limit else ""
        raise ConfigError(f"reference={storage.redact(cfg.reference)!r} has {n} images{limit}, fewer than "
                          f"fid_samples={cfg.fid_samples}: lower fid_samples to at most {n}, or give a larger "
                          "held-out set")


def step_seconds(arm: Arm, device: torch.device) -> float:
    """Seconds one optimizer step of `arm`'s first phase takes here: one micro batch forward and backward,
    timed after a warm-up, times the micro batches of a rank's share of the global batch."""
    from maskdit.method.diffusion import EDMPrecond, maskdit_loss
    from maskdit.method.model import MaskDiT

    cfg = arm.phase.cfg
    model = cfg.model
    precond = EDMPrecond(MaskDiT(model)).to(device)
    micro = min(cfg.batch.micro_batch or cfg.batch.global_batch, cfg.batch.global_batch)
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(micro, model.in_channels, model.input_size, model.input_size, generator=gen,
                     device=device)  # (B, C, H, W)
    labels = torch.randint(0, model.num_classes, (micro,), generator=gen, device=device)  # (B,)
    seconds = []
    for _ in range(2):  # the first pass pays for allocation and kernel selection
        start = time.perf_counter()
        maskdit_loss(precond, x0, labels, cfg.mask.ratio, cfg.mae_weight, generator=gen).loss.mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[-1] * -(-cfg.batch.global_batch // micro)


def check_budget(cfg: CompareConfig, arms: dict[str, Arm], device: torch.device) -> None:
    """Each evaluation point must give the unmasked arm (the slower one) time for at least one step."""
    per_point = cfg.budget_s / cfg.eval_points
    step = step_seconds(arms["dit"], device)
    if per_point < step:
        raise ConfigError(f"budget_s={cfg.budget_s:g} over eval_points={cfg.eval_points} gives each point "
                          f"{per_point:.3g} s of training, less than one step of the unmasked arm ({step:.3g} s "
                          f"measured here): raise budget_s to at least {step * cfg.eval_points:.3g} or lower "
                          "eval_points")

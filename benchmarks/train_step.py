"""The trainer's full step against the bare model step of benchmarks/throughput.py: the overhead.

    .venv/bin/python benchmarks/train_step.py --config demo --batch 64 --steps 10          # CPU
    python benchmarks/train_step.py --config XL/2 --batch 128 --precision bf16              # one GPU
    torchrun --nproc-per-node 8 benchmarks/train_step.py --config XL/2 --batch 1024 --precision bf16

Full step = `Trainer.train_step` as `maskdit train` runs it: the seeded batch plan, `LatentSet.draw`
from memory-mapped float16 shards (posterior sample on the CPU, in a prefetch thread; pinned copy
to the GPU), label dropping, autocast, maskdit_loss, backward (through DDP's hooks under torchrun),
the non-finite guard (an all-reduce and one host sync), grad-norm, AdamW, EMA foreach lerp.
Bare step = throughput.py's `Step`: the same loss, backward, AdamW (given the trainer's fused /
foreach implementation) and EMA on a fixed batch already on the device; no data, guard or DDP.
Both use the per-rank batch; timed steps alternate the two (median), so both see the same
machine load. Prints one JSON object (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import Step  # noqa: E402  (the core benchmark's bare step)

from maskdit.core import distributed  # noqa: E402
from maskdit.core.config import build_config  # noqa: E402
from maskdit.data.shards import Manifest, write_manifest, write_shard  # noqa: E402
from maskdit.method.model import model_config  # noqa: E402
from maskdit.train.config import TrainConfig  # noqa: E402
from maskdit.train.loop import Trainer  # noqa: E402

BARE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": None, "fp32": None}


def synthetic_latents(root: Path, name: str, samples: int) -> str:
    """A latent dataset of the model's shape: float16 moments in 4 shards, as `maskdit encode` writes."""
    cfg = model_config(name)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    per = samples // 4
    infos = []
    for i in range(4):
        gen = torch.Generator().manual_seed(i)
        infos.append(write_shard(str(root), i, {
            "mean": torch.randn(per, *shape, generator=gen).half(),
            "logvar": (torch.randn(per, *shape, generator=gen) - 4).half(),
            "labels": torch.randint(0, cfg.num_classes, (per,), generator=gen)}))
    write_manifest(str(root), Manifest(
        space="latent", count=4 * per, images=4 * per, channels=shape[0], resolution=8 * shape[1], shape=shape,
        dtype="float16", scale_factor=0.18215, class_names=[str(c) for c in range(cfg.num_classes)],
        shard_size=per, shards=infos))
    return str(root)


def overhead(config: str, batch: int, precision: str = "fp32", mask_ratio: float = 0.5, steps: int = 10,
             warmup: int = 3, samples: int = 4096, device: str = "auto") -> dict | None:
    """Trainer step against bare step, alternating, medians; the result on rank 0 (None on the others)."""
    dist = distributed.setup(device)
    with tempfile.TemporaryDirectory() as own_tmp:
        tmp = distributed.broadcast_object(own_tmp)  # rank 0's folder for every rank of the node
        data_dir = Path(tmp) / "latents"
        if dist.is_main:
            synthetic_latents(data_dir, config, samples)
        distributed.barrier()
        cfg = build_config(TrainConfig, {
            "model": config, "data": {"uri": str(data_dir), "cache_dir": str(Path(tmp) / "cache")},
            "batch": {"global_batch": batch}, "precision": precision,
            "mask": {"ratio": mask_ratio}, "steps": 10**9, "checkpoint": {"dir": str(Path(tmp) / "ck")},
            "device": str(dist.device.type)})
        trainer = Trainer(cfg, dist)
        per_rank = trainer.per_rank
        bare = Step(config, per_rank, dist.device, BARE_DTYPES[precision])
        # the same AdamW implementation as the trainer (fused on CUDA, foreach on CPU), so only the
        # trainer's own work differs
        defaults = trainer.optimizer.defaults
        bare.opt = torch.optim.AdamW(bare.params, lr=cfg.optim.lr, weight_decay=0.0, fused=defaults["fused"],
                                     foreach=defaults["foreach"])

        def timed(fn) -> float:
            distributed_sync(dist.device)
            start = time.perf_counter()
            fn()
            distributed_sync(dist.device)
            return time.perf_counter() - start

        full_times, bare_times = [], []
        with ThreadPoolExecutor(max_workers=1) as executor:
            for i in range(warmup):
                trainer.train_step(i, executor)
                bare(mask_ratio)
            for i in range(warmup, warmup + steps):
                # the step plus the rest of its prefetch of the next batch: the data cost counts in full,
                # and the prefetch does not steal the bare step's cores
                full_times.append(timed(lambda: (trainer.train_step(i, executor), trainer._pending[1].result())))
                bare_times.append(timed(lambda: bare(mask_ratio)))
        distributed.barrier()  # rank 0 removes the folder last
    full, base = statistics.median(full_times), statistics.median(bare_times)
    if not dist.is_main:
        return None
    return {
        "model": config,
        "params_m": round(sum(p.numel() for p in trainer.params) / 1e6, 2),
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "world_size": dist.world_size,
        "global_batch": batch,
        "per_rank_batch": per_rank,
        "precision": precision,
        "mask_ratio": mask_ratio,
        "trainer_s_per_step": round(full, 5),
        "bare_s_per_step": round(base, 5),
        "trainer_img_per_s": round(batch / full, 2),
        "bare_img_per_s_per_rank": round(per_rank / base, 2),
        "overhead_pct": round(100 * (full / base - 1), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="model preset (maskdit.method.model.MODEL_PRESETS)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over torchrun ranks)")
    parser.add_argument("--precision", choices=sorted(BARE_DTYPES), default="fp32")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096, help="synthetic latents on disk")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    result = overhead(args.config, args.batch, args.precision, args.mask_ratio, args.steps, args.warmup,
                      args.samples, args.device)
    if result is not None:
        print(json.dumps(result), flush=True)
    distributed.teardown()


def distributed_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())

"""What the training-time monitor (maskdit/train/monitor.py) costs for the demo config, on this machine.

    .venv/bin/python benchmarks/monitor_cost.py /tmp/monitor-cost [--images 64]

Random weights and random 32 x 32 one-channel digits-shaped pixels (the cost does not depend on
them), the `mnist_pretrain` preset's model and monitor settings. Times a training step, one grid,
the reference statistics and a quick FID of `--images` images (sampling and Inception apart),
and the Frechet distance at n = 2,000 both ways; prints one JSON object with the times and the
per-run projection for the preset's defaults (fid_samples 2,000, ref_samples 10,000).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maskdit.core import distributed
from maskdit.core.config import load_config
from maskdit.data.shards import Manifest, write_manifest, write_shard
from maskdit.evaluation import fid
from maskdit.evaluation.sample import generate, random_labels
from maskdit.train.config import TrainConfig
from maskdit.train.loop import Trainer
from maskdit.train.monitor import Monitor

PRESET = Path(__file__).resolve().parents[1] / "maskdit" / "configs" / "mnist_pretrain.yaml"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scratch", type=Path)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    n = max(args.images, 256)
    pixels = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8)
    info = write_shard(str(args.scratch / "data"), 0, {"pixels": pixels, "labels": torch.arange(n) % 10})
    write_manifest(str(args.scratch / "data"), Manifest(
        space="pixel", count=n, images=n, channels=1, resolution=32, shape=(1, 32, 32), dtype="uint8",
        scale_factor=1.0, class_names=[str(i) for i in range(10)], shard_size=n, shards=[info]))
    cfg = load_config(TrainConfig, PRESET, [f"data.uri={args.scratch / 'data'}", "device=cpu",
                                            f"checkpoint.dir={args.scratch / 'ck'}",
                                            f"monitor.ref_samples={args.images}"])
    trainer = Trainer(cfg, distributed.setup(cfg.device))
    monitor = Monitor(cfg, trainer.dist, trainer.data, trainer.ema, active=True)
    with ThreadPoolExecutor(1) as executor:
        trainer.train_step(0, executor)
        _, step_s = timed(lambda: [trainer.train_step(k, executor) for k in range(1, 4)])
    _, grid_s = timed(lambda: monitor.sample_grid(0))
    _, ref_s = timed(monitor.reference)
    labels = random_labels(args.images, trainer.data.num_classes, 0)
    images, sample_s = timed(lambda: generate(monitor.ema, monitor.decode, labels, list(range(args.images)),
                                              cfg.monitor.sampler, cfg.monitor.batch_size))
    _, inception_s = timed(lambda: monitor.inception()(images))
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(2000, 2048)), fid.feature_stats(rng.normal(size=(3000, 2048)))
    _, distance_s = timed(lambda: fid.fid_from_features(feats, ref))
    stats = fid.feature_stats(feats)
    _, full_s = timed(lambda: fid.fid_from_stats(stats, ref))
    per_image = (sample_s + inception_s) / args.images
    print(json.dumps({
        "threads": torch.get_num_threads(), "train_step_s": step_s / 3, "grid_s": grid_s,
        "grid_images": len(monitor.classes) * cfg.monitor.grid_columns, "sampler_steps": cfg.monitor.sampler.num_steps,
        "fid_sample_s_per_image": sample_s / args.images, "inception_s_per_image": inception_s / args.images,
        "reference_s_per_image": ref_s / args.images, "distance_n2000_s": distance_s, "distance_full_2048_s": full_s,
        "quick_fid_2000_s": 2000 * per_image + distance_s, "reference_10000_s": 10000 * ref_s / args.images,
    }, indent=1))


if __name__ == "__main__":
    main()

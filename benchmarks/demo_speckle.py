"""Where a digit model's speckle comes from: the same samples under one change at a time (issue 27).

    .venv/bin/python benchmarks/demo_speckle.py <tune checkpoint> <encoded dataset> --out speckle.json \
        --grids docs/img/speckle

Every variant draws the same labels and seeds (20 a class by default) from the checkpoint, changing
one thing against the baseline (EMA weights, CFG 4, 18 Heun steps): the weights (EMA or the raw
training weights), the guidance scale, the number of sampler steps. Each is scored by:
- stray pixels: the share of pixels >= 64 (of 255) that have no pixel >= 128 within 2 pixels,
  i.e. ink that belongs to no stroke (real digits: the floor, printed alongside);
- isolated pixels per image: pixels >= 128 none of whose 8 neighbours is >= 128;
- accuracy: the reference digit classifier's (maskdit.evaluation.classifier);
and the same two speckle figures of as many real digits of the dataset are the floor. JSON out;
a grid per variant (row = class) with --grids. One torch thread; the CPU seconds of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from maskdit.evaluation.classifier import mnist_classifier
from maskdit.evaluation.sample import generate, save_grid
from maskdit.evaluation.sources import load_sampler_source
from maskdit.method.diffusion import SamplerConfig

VARIANTS = {  # name: (weights, cfg_scale, num_steps); the first is the baseline
    "baseline (EMA, CFG 4, 18 steps)": ("ema", 4.0, 18),
    "raw weights": ("raw", 4.0, 18),
    "CFG 1.5": ("ema", 1.5, 18),
    "CFG 2.5": ("ema", 2.5, 18),
    "CFG 6": ("ema", 6.0, 18),
    "10 steps": ("ema", 4.0, 10),
    "40 steps": ("ema", 4.0, 40),
}


def speckle(images: np.ndarray) -> dict[str, float]:
    """Stray-ink share and isolated bright pixels of uint8 images (N, H, W[, 3]) (grey: the first channel)."""
    grey = torch.from_numpy(np.ascontiguousarray(images[..., 0] if images.ndim == 4 else images)).float()[:, None]
    ink, stroke = grey >= 64, (grey >= 128).float()  # (N, 1, H, W)
    near_stroke = torch.nn.functional.max_pool2d(stroke, 5, stride=1, padding=2) > 0  # within 2 pixels
    stray = (ink & ~near_stroke).sum() / ink.sum().clamp(min=1)
    neighbours = torch.nn.functional.conv2d(stroke, torch.ones(1, 1, 3, 3), padding=1) - stroke  # (N, 1, H, W)
    isolated = ((stroke > 0) & (neighbours == 0)).sum() / len(grey)
    return {"stray_share": float(stray), "isolated_per_image": float(isolated)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("dataset", help="the encoded data set (its manifest decodes the samples; its digits: the floor)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS (default: all)")
    parser.add_argument("--out", default="speckle.json")
    parser.add_argument("--grids", default=None, help="folder for a grid per variant (8 a class)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from maskdit.data.latents import load_dataset
    from maskdit.method.checkpoint import resolve
    from maskdit.method.weights import ema_precond

    load = os.getloadavg()
    classifier = mnist_classifier()
    source = load_sampler_source(args.checkpoint, "cpu", args.dataset)
    _, state = resolve(args.checkpoint)
    raw, _ = ema_precond({**state, "ema": state["model"]}, args.checkpoint, "cpu")
    labels = torch.arange(10).repeat_interleave(args.per_class)  # (N,) class c in rows c
    data = load_dataset(args.dataset)
    real = data.decode(data.draw(torch.arange(min(len(labels), len(data))),
                                 generator=torch.Generator().manual_seed(0))).numpy()  # (N, H, W, 3)
    rows = [{"variant": "real digits (the floor)", **speckle(real)}]
    print(f"{rows[0]['variant']:32s} stray {rows[0]['stray_share']:.4f}  isolated/img "
          f"{rows[0]['isolated_per_image']:.2f}", flush=True)
    for name in args.variants:
        weights, cfg_scale, steps = VARIANTS[name]
        started = time.process_time()
        images = generate(source.precond if weights == "ema" else raw, source.decode, labels,
                          list(range(len(labels))), SamplerConfig(cfg_scale=cfg_scale, num_steps=steps),
                          batch_size=100).numpy()  # (N, H, W, 3)
        accuracy = float((classifier.predict(images) == labels.numpy()).mean())
        row = {"variant": name, "weights": weights, "cfg_scale": cfg_scale, "num_steps": steps,
               "accuracy": accuracy, **speckle(images), "cpu_s": round(time.process_time() - started, 1)}
        rows.append(row)
        print(f"{name:32s} stray {row['stray_share']:.4f}  isolated/img {row['isolated_per_image']:.2f}  "
              f"accuracy {accuracy:.3f}  cpu {row['cpu_s']:.0f} s", flush=True)
        if args.grids:
            os.makedirs(args.grids, exist_ok=True)
            per = min(8, args.per_class)
            order = [c * args.per_class + j for c in range(10) for j in range(per)]
            slug = name.split(" (")[0].replace(" ", "-").replace(".", "")
            save_grid(images[order], 10, os.path.join(args.grids, f"{slug}.png"))
    with open(args.out, "w") as f:
        json.dump({"checkpoint": args.checkpoint, "step": int(state["step"]), "per_class": args.per_class,
                   "load_before": load, "load_after": os.getloadavg(), "rows": rows}, f, indent=1)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

"""Class accuracy of a digit model's samples at several guidance scales and sampler steps.

    .venv/bin/python benchmarks/demo_accuracy.py demo-output/store/runs/<id>/tune/ckpt-000000200.pt \
        demo-output/store/datasets/mnist-32-pixel 1.5:18 4:18 4:40

Each CFG:STEPS pair: 20 samples a class (seeds 0-199, the same for every pair), labelled by the
reference classifier (maskdit.evaluation.classifier); prints the accuracy, per class, and the CPU-seconds.
One torch thread: on a shared machine the CPU time, not the wall clock, is what compares.
"""

from __future__ import annotations

import argparse
import time

import torch

from maskdit.evaluation.classifier import mnist_classifier
from maskdit.evaluation.sample import generate
from maskdit.evaluation.sources import load_sampler_source
from maskdit.method.diffusion import SamplerConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("dataset", help="the encoded data set (its manifest decodes the samples)")
    parser.add_argument("settings", nargs="+", help="CFG:STEPS pairs, e.g. 4:18")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    classifier = mnist_classifier()
    source = load_sampler_source(args.checkpoint, "cpu", args.dataset)
    labels = torch.arange(10).repeat_interleave(args.per_class)  # (N,)
    for setting in args.settings:
        cfg_scale, steps = setting.split(":")
        started = time.process_time()
        images = generate(source.precond, source.decode, labels, list(range(len(labels))),
                          SamplerConfig(cfg_scale=float(cfg_scale), num_steps=int(steps)), batch_size=100)
        right = classifier.predict(images) == labels.numpy()  # (N,)
        per_class = [right[labels.numpy() == c].mean() for c in range(10)]
        print(f"cfg {cfg_scale} steps {steps}: accuracy {right.mean():.3f}  per class "
              f"{' '.join(f'{p:.2f}' for p in per_class)}  cpu {time.process_time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

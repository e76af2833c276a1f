"""The registered model's weights in fp32, bf16 and fp16: their size, and the FID each gives (issue 25).

    .venv/bin/python benchmarks/registered_weights.py --samples 100 --seed-sets 3   # CPU, a few minutes

A tiny MaskDiT (in_channels 1, 8x8 pixels, random weights of std 0.2 so that its samples vary: the
numbers measure rounding, not quality) samples `--samples` images for each of `--seed-sets` seed
sets with its fp32 weights (the spread of those FIDs is the noise: another draw of the same model),
then for the first seed set again with its weights rounded to bf16 and to fp16 and read back as
`maskdit register` stores them (`maskdit.method.weights.save_ema` / `read_ema`; fp16 through the same
file layout). The FID is against real MNIST digits resized to 8x8 (`--reference` of them), all with
the bundled Inception. Also the file sizes: fp32 `torch.save` of the EMA (the format-1 artifact)
against the safetensors file, and the XL/2 EMA's size from its parameter count (meta device).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdit.data.decode import to_uint8_images  # noqa: E402
from maskdit.evaluation import fid  # noqa: E402
from maskdit.evaluation.inception import InceptionFeatures  # noqa: E402
from maskdit.evaluation.sample import generate_batches, random_labels  # noqa: E402
from maskdit.method import weights  # noqa: E402
from maskdit.method.diffusion import EDMPrecond, SamplerConfig  # noqa: E402
from maskdit.method.model import MaskDiT, model_config  # noqa: E402


def real_digits(n: int) -> np.ndarray:
    """(n, 8, 8, 3) uint8 MNIST digits, area-resized from 28x28."""
    from maskdit.data.mnist import mnist_arrays

    images, _ = mnist_arrays()
    x = torch.as_tensor(images[:n], dtype=torch.float32)[:, None]  # (n, 1, 28, 28)
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")  # (n, 1, 8, 8)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed-sets", type=int, default=3)
    parser.add_argument("--reference", type=int, default=500)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = model_config("tiny", in_channels=1)
    torch.manual_seed(0)
    net = MaskDiT(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    inception = InceptionFeatures()
    ref = fid.feature_stats(inception.features([real_digits(args.reference)]))
    sampler = SamplerConfig(num_steps=args.steps)
    labels = random_labels(args.samples, cfg.num_classes, 0)

    def score(state: dict[str, torch.Tensor], seed_set: int) -> float:
        model = MaskDiT(cfg)
        model.load_state_dict(state)
        precond = EDMPrecond(model).eval().requires_grad_(False)
        seeds = [seed_set * args.samples + i for i in range(args.samples)]
        batches = generate_batches(precond, to_uint8_images, labels, seeds, sampler, 50)
        return fid.fid_from_stats(fid.feature_stats(inception.features(batches)), ref)

    sizes, rounded = {}, {}
    buffer = io.BytesIO()
    torch.save({"model_config": cfg.model_dump(), "model": ema, "ema": ema, "step": 0}, buffer)
    sizes["format1_fp32_torch_save_bytes"] = buffer.getbuffer().nbytes
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            saved = weights.WEIGHTS_DTYPE
            weights.WEIGHTS_DTYPE = dtype  # save_ema writes this dtype
            try:
                path = weights.save_ema(Path(tmp) / f"{name}.safetensors", ema, model_config=cfg.model_dump(), step=0,
                                        train_config=None)
            finally:
                weights.WEIGHTS_DTYPE = saved
            sizes[f"{name}_safetensors_bytes"] = path.stat().st_size
            rounded[name] = weights.read_ema(path, name)["ema"]
    fp32 = [score(ema, s) for s in range(args.seed_sets)]
    result = {
        "samples": args.samples, "reference": args.reference, "steps": args.steps,
        "fid_fp32_per_seed_set": fp32, "fid_fp32_seed_std": statistics.stdev(fp32) if len(fp32) > 1 else None,
        "fid_bf16_seed_set_0": score(rounded["bf16"], 0), "fid_fp16_seed_set_0": score(rounded["fp16"], 0),
        "max_abs_weight_error": {k: max(float((v[n] - ema[n]).abs().max()) for n in ema) for k, v in rounded.items()},
        **sizes,
    }
    with torch.device("meta"):
        xl = sum(p.numel() for p in MaskDiT(model_config("XL/2")).parameters())
    result.update(xl2_parameters=xl, xl2_ema_fp32_gib=xl * 4 / 2**30, xl2_ema_bf16_gib=xl * 2 / 2**30)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

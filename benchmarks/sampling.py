"""Sampling and FID throughput: EDM Heun with CFG, VAE decode, Inception features, the 2048-d square root.

    .venv/bin/python benchmarks/sampling.py --config demo --batch 16 --threads 1          # CPU
    .venv/bin/python benchmarks/sampling.py --config XL/2 --batch 4 --repeats 1 --vae      # CPU, slow
    python benchmarks/sampling.py --config XL/2 --batch 256 --device cuda --dtype bf16 --vae --inception-batch 500

Random weights (the cost does not depend on them). One sample costs 2 * steps - 1 network
evaluations (Heun), each a forward pass of 2 B images with CFG (cond + null halves). The VAE is
diffusers' AutoencoderKL in the SD-VAE shape (sd-vae-ft-mse config), randomly initialised: only
its decoder is timed. Inception is the bundled TF 2015-12-05 network on uint8 images at the
decoded resolution (resize to 299 included). FLOPs per image are counted with torch's
FlopCounterMode (matmuls, convolutions, attention). Prints one JSON object.

FID-50K on one node of G GPUs takes about
    50000 / G * (1 / sample_img_s + 1 / decode_img_s + 1 / inception_img_s) + sqrtm_s
with per-GPU rates measured on the GPU (the script prints this projection for G = 8 from the
rates it measured, which on a CPU says nothing about a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from maskdit.diffusion import EDMPrecond, sample_latents
from maskdit.model import MaskDiT, model_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sd_vae(device: torch.device, dtype: torch.dtype):
    """AutoencoderKL with stabilityai/sd-vae-ft-mse's architecture, random weights (timing only)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="model preset (demo, S/2, XL/2, ...)")
    parser.add_argument("--batch", type=int, default=16, help="images per sampler call")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the network")
    parser.add_argument("--vae", action="store_true", help="also time SD-VAE decoding (latent models)")
    parser.add_argument("--inception-batch", type=int, default=16)
    parser.add_argument("--inception-repeats", type=int, default=3)
    parser.add_argument("--no-sqrtm", action="store_true", help="skip timing the 2048-d matrix square root")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    cfg = model_config(args.config)
    torch.manual_seed(0)
    precond = EDMPrecond(MaskDiT(cfg)).to(device).eval().requires_grad_(False)
    labels = torch.randint(cfg.num_classes, (args.batch,), device=device)
    seeds = list(range(args.batch))

    def run_sampler():
        with autocast:
            return sample_latents(precond, labels, seeds, cfg_scale=args.cfg_scale, num_steps=args.steps)

    calls = 2 * args.steps - 1
    with torch.no_grad():
        one = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        flops_per_call = count_flops(lambda: precond(one, torch.ones(2, device=device), torch.tensor([0, cfg.num_classes], device=device)))
    sample_s = timed(run_sampler, args.repeats, args.warmup, device)
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "config": args.config, "params_M": round(sum(p.numel() for p in precond.parameters()) / 1e6, 2),
        "batch": args.batch, "steps": args.steps, "cfg_scale": args.cfg_scale, "network_calls": calls,
        "sample_s_per_batch": round(sample_s, 3), "sample_img_s": round(args.batch / sample_s, 3),
        "s_per_network_call": round(sample_s / calls, 4),  # 40-step rate = batch / (79 * this)
        "sample_gflop_per_img": round(flops_per_call * calls / 1e9, 1),  # cond + null forward, 79 calls
    }

    side = cfg.input_size
    if args.vae:
        vae = sd_vae(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        z = torch.randn(args.batch, 4, cfg.input_size, cfg.input_size, device=device, dtype=vae.dtype)
        with torch.no_grad():
            decode_s = timed(lambda: vae.decode(z).sample, args.repeats, args.warmup, device)
            result["decode_gflop_per_img"] = round(count_flops(lambda: vae.decode(z[:1]).sample) / 1e9, 1)
        result["decode_img_s"] = round(args.batch / decode_s, 3)
        side = cfg.input_size * 8

    from maskdit import fid

    inception = fid.InceptionFeatures(device=device)
    images = torch.randint(0, 256, (args.inception_batch, side, side, 3), dtype=torch.uint8)
    inception_s = timed(lambda: inception(images), args.inception_repeats, 1, device)
    with torch.inference_mode():
        x = fid.preprocess(images[:1], device)
        result["inception_gflop_per_img"] = round(count_flops(lambda: inception.net(x)) / 1e9, 2)
    result.update(inception_input=f"{side}x{side} uint8", inception_batch=args.inception_batch,
                  inception_img_s=round(args.inception_batch / inception_s, 3))

    if not args.no_sqrtm:
        feats = np.random.default_rng(0).standard_normal((4096, fid.FEATURE_DIM))
        a, b = fid.feature_stats(feats[:2048] * 1.1), fid.feature_stats(feats[2048:])
        start = time.perf_counter()
        fid.fid_from_stats(a, b)
        result["fid_sqrtm_s"] = round(time.perf_counter() - start, 2)

    per_image = 1 / result["sample_img_s"] + 1 / result.get("decode_img_s", float("inf")) + 1 / result["inception_img_s"]
    result["fid50k_8gpu_projection_s"] = round(50_000 / 8 * per_image + result.get("fid_sqrtm_s", 0), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Sampling and FID throughput: EDM Heun with CFG, VAE decode, Inception features, the 2048-d square root.

    .venv/bin/python benchmarks/sampling.py --config demo --batch 16 --threads 1          # CPU
    .venv/bin/python benchmarks/sampling.py --config demo --batch 16 --threads 1 --compare  # eager vs compiled
    .venv/bin/python benchmarks/sampling.py --config XL/2 --batch 4 --repeats 1 --vae      # CPU, slow
    python benchmarks/sampling.py --config XL/2 --batch 256 --device cuda --precision bf16 --vae --inception-batch 500

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
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from throughput import time_interleaved  # noqa: E402  (alternating timer of the core benchmark)

from maskdit.method.diffusion import EDMPrecond, sample_latents  # noqa: E402
from maskdit.method.model import MaskDiT, model_config  # noqa: E402


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


def sampler_fn(precond: EDMPrecond, batch: int, steps: int, cfg_scale: float, precision: str = "fp32",
               compile_: bool = False):
    """A call that samples `batch` latents with the Heun sampler (SamplerConfig's precision / compile)."""
    cfg, device = precond.config, next(precond.parameters()).device
    labels = torch.randint(cfg.num_classes, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    seeds = list(range(batch))
    return lambda: sample_latents(precond, labels, seeds, cfg_scale=cfg_scale, num_steps=steps,
                                  precision=precision, compile=compile_)


def baseline_fn(path: str, precond: EDMPrecond, batch: int, steps: int, cfg_scale: float):
    """`sampler_fn` with the `sample_latents` of the diffusion module at `path` (its defaults)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_diffusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = next(precond.parameters()).device
    labels = torch.randint(precond.config.num_classes, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    return lambda: module.sample_latents(precond, labels, list(range(batch)), cfg_scale=cfg_scale, num_steps=steps)


def network_gflop_per_img(precond: EDMPrecond, steps: int) -> float:
    """FLOPs of one image's sampling: 2 * steps - 1 calls, each a cond + null forward."""
    cfg, device = precond.config, next(precond.parameters()).device
    with torch.no_grad():
        one = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        labels = torch.tensor([0, cfg.num_classes], device=device)
        flops = count_flops(lambda: precond(one, torch.ones(2, device=device), labels))
    return flops * (2 * steps - 1) / 1e9


def decode_img_s(vae, latent_size: int, batch: int, repeats: int, warmup: int, device: torch.device) -> float:
    z = torch.randn(batch, 4, latent_size, latent_size, device=device, dtype=vae.dtype)
    with torch.no_grad():
        return batch / timed(lambda: vae.decode(z).sample, repeats, warmup, device)


def inception_img_s(side: int, batch: int, repeats: int, device: torch.device, weights: str | None = None) -> float:
    """Inception-v3 pool3 features (the bundled TF 2015-12-05 network, or `weights`) of uint8 images, resize included."""
    from maskdit.evaluation.inception import InceptionFeatures

    inception = InceptionFeatures(weights, device=device)
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8)
    # three warm-up calls: TorchScript's profiling executor optimises the graph after its first runs
    return batch / timed(lambda: inception(images), repeats, 3, device)


def sqrtm_s() -> float:
    """The 2048-d matrix square root of FID (on the CPU, once per evaluation)."""
    from maskdit.evaluation import fid
    from maskdit.evaluation.inception import FEATURE_DIM

    feats = np.random.default_rng(0).standard_normal((4096, FEATURE_DIM))
    a, b = fid.feature_stats(feats[:2048] * 1.1), fid.feature_stats(feats[2048:])
    start = time.perf_counter()
    fid.fid_from_stats(a, b)
    return time.perf_counter() - start


def fid50k_seconds(sample: float, decode: float, inception: float, sqrtm: float, gpus: int = 8) -> float:
    """Wall time of FID-50K on `gpus` GPUs from per-GPU img/s rates (the module docstring's formula)."""
    return 50_000 / gpus * (1 / sample + 1 / decode + 1 / inception) + sqrtm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="model preset (demo, S/2, XL/2, ...)")
    parser.add_argument("--batch", type=int, default=16, help="images per sampler call")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "tf32"], default="fp32",
                        help="SamplerConfig.precision of the network calls")
    parser.add_argument("--compile", action="store_true", help="SamplerConfig.compile: torch.compile the network call")
    parser.add_argument("--compare", action="store_true",
                        help="time eager and compiled sampling alternately in this process (ratio; no VAE/FID)")
    parser.add_argument("--baseline", default=None, metavar="FILE",
                        help="with --compare: also time sample_latents of another diffusion.py (e.g. an older "
                             "commit's, from `git show REV:maskdit/method/diffusion.py > FILE`)")
    parser.add_argument("--vae", action="store_true", help="also time SD-VAE decoding (latent models)")
    parser.add_argument("--inception-batch", type=int, default=16)
    parser.add_argument("--inception-repeats", type=int, default=3)
    parser.add_argument("--no-sqrtm", action="store_true", help="skip timing the 2048-d matrix square root")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = model_config(args.config)
    torch.manual_seed(0)
    precond = EDMPrecond(MaskDiT(cfg)).to(device).eval().requires_grad_(False)
    calls = 2 * args.steps - 1
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": args.precision,
        "config": args.config, "params_M": round(sum(p.numel() for p in precond.parameters()) / 1e6, 2),
        "batch": args.batch, "steps": args.steps, "cfg_scale": args.cfg_scale, "network_calls": calls,
        "sample_gflop_per_img": round(network_gflop_per_img(precond, args.steps), 1),  # cond + null forward
    }
    if args.compare:
        eager = sampler_fn(precond, args.batch, args.steps, args.cfg_scale, args.precision)
        compiled = sampler_fn(precond, args.batch, args.steps, args.cfg_scale, args.precision, compile_=True)
        fns = {"eager": eager, "compiled": compiled}
        if args.baseline:
            fns["baseline"] = baseline_fn(args.baseline, precond, args.batch, args.steps, args.cfg_scale)
        for _ in range(args.warmup):
            eager()
        start = time.perf_counter()
        compiled()  # compilation and the first call
        result["compile_and_first_call_s"] = round(time.perf_counter() - start, 1)
        times = time_interleaved(fns, args.repeats, device)
        for name, seconds in times.items():
            result[f"{name}_img_s"] = round(args.batch / statistics.median(seconds), 3)
        medians = {name: statistics.median(seconds) for name, seconds in times.items()}
        result["compiled_vs_eager_speedup"] = round(medians["eager"] / medians["compiled"], 3)
        if args.baseline:
            result["eager_vs_baseline_speedup"] = round(medians["baseline"] / medians["eager"], 3)
            result["compiled_vs_baseline_speedup"] = round(medians["baseline"] / medians["compiled"], 3)
        print(json.dumps(result))
        return

    sample_s = timed(sampler_fn(precond, args.batch, args.steps, args.cfg_scale, args.precision, args.compile),
                     args.repeats, args.warmup, device)
    # s_per_network_call: the 40-step rate is batch / (79 * this)
    result.update(compile=args.compile, sample_s_per_batch=round(sample_s, 3),
                  sample_img_s=round(args.batch / sample_s, 3), s_per_network_call=round(sample_s / calls, 4))

    side = cfg.input_size
    if args.vae:
        vae = sd_vae(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
        decode = decode_img_s(vae, cfg.input_size, args.batch, args.repeats, args.warmup, device)
        result["decode_img_s"] = round(decode, 3)
        z = torch.randn(1, 4, cfg.input_size, cfg.input_size, device=device, dtype=vae.dtype)
        with torch.no_grad():
            result["decode_gflop_per_img"] = round(count_flops(lambda: vae.decode(z).sample) / 1e9, 1)
        side = cfg.input_size * 8

    result.update(inception_input=f"{side}x{side} uint8", inception_batch=args.inception_batch,
                  inception_img_s=round(inception_img_s(side, args.inception_batch, args.inception_repeats, device), 3))
    if not args.no_sqrtm:
        result["fid_sqrtm_s"] = round(sqrtm_s(), 2)
    result["fid50k_8gpu_projection_s"] = round(fid50k_seconds(
        result["sample_img_s"], result.get("decode_img_s", float("inf")), result["inception_img_s"],
        result.get("fid_sqrtm_s", 0.0)), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

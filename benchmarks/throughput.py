"""Training-step throughput of MaskDiT: mask ratio 0.5 against 0 in the same run.

    .venv/bin/python benchmarks/throughput.py --configs S/4,demo --batch 32 --steps 5   # CPU
    .venv/bin/python benchmarks/throughput.py --configs XL/2 --batch 64 --flops-only    # any machine
    .venv/bin/python benchmarks/throughput.py --configs demo --batch 32 --compare-compile model,step  # vs eager
    python benchmarks/throughput.py --configs XL/2 --batch 64 --device cuda --dtype bf16 --compile model

A step is what training does: maskdit_loss forward (eq. 6-8), backward, AdamW (lr 1e-4, no weight
decay), EMA update (0.9999). Random data; the first `--warmup` steps (and compilation) are not timed;
timed steps alternate the two ratios and s_per_step is the median (robust to a busy machine).
Prints one JSON object per (config, mask ratio), then one per config with the 0.5 / 0 ratios.
FLOPs per step are counted once with torch's FlopCounterMode (matmuls, convolutions, attention; the
elementwise rest is not counted); on CUDA they give TFLOP/s and MFU against the card's dense peak.
Peak memory: CUDA max allocated per config; on CPU the process's peak RSS (monotone over a run).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskdit.method.compiled import training_loss
from maskdit.method.diffusion import EDMPrecond, maskdit_loss
from maskdit.method.model import MaskDiT, ModelConfig, model_config, num_masked
from maskdit.train.config import OptimConfig
from maskdit.train.step import build_optimizer

MASK_RATIOS = (0.0, 0.5)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16/fp16


def _attention_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, length, e = q
    return 2 * b * h * length * k[2] * (e + v[3])  # Q K^T and P V


def _attention_backward_flops(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, length, e = q
    return 2 * b * h * length * k[2] * (3 * e + 2 * v[3])  # recomputed Q K^T, dV, dP, dQ, dK


# torch counts the CUDA attention kernels; the CPU flash kernel has no formula registered
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


class Step:
    """One training step with its own model, optimizer and EMA; `compile_` is the training config's `compile`."""

    def __init__(self, name: str, batch: int, device: torch.device, dtype: torch.dtype | None, compile_: str = "off",
                 seed: int = 0, backend: str = "inductor"):
        cfg = model_config(name)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        torch.manual_seed(seed)
        self.precond = EDMPrecond(MaskDiT(cfg)).to(device)
        self.ema = copy.deepcopy(self.precond).requires_grad_(False)
        self.params = [p for p in self.precond.parameters() if p.requires_grad]
        self.ema_params = [p for p in self.ema.parameters()]
        self.opt = build_optimizer(self.params, OptimConfig(), device)  # the trainer's: fused on CUDA
        self.model = self.precond
        self.loss_fn = training_loss(self.precond.net, compile_, backend)
        self.x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)  # (B, C, H, W)
        self.labels = torch.randint(0, cfg.num_classes, (batch,), device=device)  # (B,)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, mask_ratio: float) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = maskdit_loss(self.model, self.x0, self.labels, mask_ratio, loss_fn=self.loss_fn).loss.mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - 0.9999)

    def flops(self, mask_ratio: float) -> int:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            self(mask_ratio)
        return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def analytic_flops(cfg: ModelConfig, batch: int, mask_ratio: float) -> dict[str, int]:
    """Matmul FLOPs of one training step from the shapes (2 per multiply-add; backward = 2 x forward).

    Per sample and block of width W on T tokens (MLP width M, condition width Dc): qkv + proj
    2 T 4 W^2, MLP 2 T 2 W M, attention (Q K^T and P V) 4 T^2 W, adaLN 2 Dc 6 W. The encoder runs on
    L_keep = L - floor(r L) tokens, the decoder (projection, blocks, final layer) on all L; the patch
    embedding sees all L, the final layer maps to p^2 C. Elementwise work is not counted, as in the
    MFU convention (PaLM, Megatron); flash attention's recomputation in the backward is not counted.
    """
    length = cfg.num_tokens
    keep = length - num_masked(length, mask_ratio) if mask_ratio > 0 else length
    d, patch = cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels

    def block(tokens: int, width: int) -> int:
        mlp = int(width * cfg.mlp_ratio)
        return 2 * tokens * 4 * width**2 + 2 * tokens * 2 * width * mlp + 4 * tokens**2 * width + 2 * d * 6 * width

    encoder = 2 * length * patch * d + 2 * 256 * d + 2 * d * d + cfg.depth * block(keep, d)  # + time embedding MLP
    if cfg.decoder_depth > 0:
        dd = cfg.decoder_hidden_size
        decoder = 2 * d * 2 * d + 2 * keep * d * dd + cfg.decoder_depth * block(length, dd)
        decoder += 2 * d * 2 * dd + 2 * length * dd * patch
    else:
        decoder = 2 * d * 2 * d + 2 * keep * d * patch  # the final layer on the encoder's tokens
    return {"encoder": 3 * batch * encoder, "decoder": 3 * batch * decoder, "total": 3 * batch * (encoder + decoder)}


def time_back_to_back(fns: dict, repeats: int, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each `fn`, as `steps` calls back to back between two syncs (the host queues work
    while the GPU runs, as in training), `repeats` rounds, the fns in turn within a round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def time_interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each `fn()` over `repeats` rounds; each round runs every fn once, in turn, so that all of
    them see the same machine load (warm-up and compilation are the caller's)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def count_only(args: argparse.Namespace) -> list[dict]:
    """FLOPs of forward + backward per step, on the meta device (no memory, no time): any size on any machine."""
    results = []
    for name in args.configs.split(","):
        cfg = model_config(name)
        with torch.device("meta"):
            precond = EDMPrecond(MaskDiT(cfg))
            x0 = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size)  # (B, C, H, W)
            labels = torch.randint(0, cfg.num_classes, (args.batch,))  # (B,)
        flops = {}
        for ratio in MASK_RATIOS:
            with FlopCounterMode(display=False) as counter:
                maskdit_loss(precond, x0, labels, ratio).loss.mean().backward()
            flops[ratio] = counter.get_total_flops()
            row = {
                "model": name,
                "params_m": round(sum(p.numel() for p in precond.parameters()) / 1e6, 2),
                "batch": args.batch,
                "mask_ratio": ratio,
                "device": "meta (FLOPs only)",
                "gflop_per_step": float(f"{flops[ratio] / 1e9:.4g}"),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
        summary = {"model": name, "batch": args.batch, "flop_ratio_0.5_vs_0": round(flops[0.5] / flops[0.0], 3)}
        print(json.dumps(summary), flush=True)
        results.append(summary)
    return results


def run(args: argparse.Namespace) -> list[dict]:
    if args.flops_only:
        return count_only(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    peak = peak_tflops(device, args.peak_tflops)
    results = []
    for name in args.configs.split(","):
        step = Step(name, args.batch, device, dtype, args.compile)
        peak_mem = {}
        for ratio in MASK_RATIOS:  # warm-up (and compilation), peak memory per ratio
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.warmup):
                step(ratio)
            sync(device)
            peak_mem[ratio] = peak_memory_gb(device)
        times = {ratio: [] for ratio in MASK_RATIOS}
        for _ in range(args.steps):  # alternate the ratios so that both see the same machine load
            for ratio in MASK_RATIOS:
                start = time.perf_counter()
                step(ratio)
                sync(device)
                times[ratio].append(time.perf_counter() - start)
        by_ratio = {}
        for ratio in MASK_RATIOS:
            seconds = statistics.median(times[ratio])
            flops = step.flops(ratio)
            row = {
                "model": name,
                "params_m": round(sum(p.numel() for p in step.params) / 1e6, 2),
                "batch": args.batch,
                "mask_ratio": ratio,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "compile": args.compile,
                "s_per_step": round(seconds, 5),
                "s_per_step_mean": round(statistics.fmean(times[ratio]), 5),
                "img_per_s": round(args.batch / seconds, 2),
                "peak_mem_gb": round(peak_mem[ratio], 3),
                "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_process_max_rss",
                "gflop_per_step": float(f"{flops / 1e9:.4g}"),
            }
            if device.type == "cuda":
                row["tflops"] = round(flops / seconds / 1e12, 2)
                row["mfu"] = round(flops / seconds / 1e12 / peak, 4) if peak else None
            print(json.dumps(row), flush=True)
            by_ratio[ratio] = row
            results.append(row)
        masked, full = by_ratio[0.5], by_ratio[0.0]
        summary = {
            "model": name,
            "batch": args.batch,
            "step_time_ratio_0.5_vs_0": round(masked["s_per_step"] / full["s_per_step"], 3),
            "flop_ratio_0.5_vs_0": round(masked["gflop_per_step"] / full["gflop_per_step"], 3),
        }
        print(json.dumps(summary), flush=True)
        results.append(summary)
        del step
    return results


def compare_compile(name: str, batch: int, device: torch.device, dtype: torch.dtype | None, modes: list[str],
                    mask_ratios: tuple[float, ...], steps: int, warmup: int) -> list[dict]:
    """Eager against compiled training steps in one process: the same weights and batch, steps alternating
    over (mode, ratio) so every variant sees the same machine load. compile_s = the first steps (all
    ratios, where compilation happens) minus as many eager steps."""
    variants = {mode: Step(name, batch, device, dtype, mode) for mode in ["off", *modes]}
    first: dict[str, float] = {}
    for mode, step in variants.items():
        start = time.perf_counter()
        for ratio in mask_ratios:
            step(ratio)
        sync(device)
        first[mode] = time.perf_counter() - start
        for _ in range(warmup):
            for ratio in mask_ratios:
                step(ratio)
    fns = {(mode, ratio): (lambda s=step, r=ratio: s(r)) for mode, step in variants.items() for ratio in mask_ratios}
    times = time_interleaved(fns, steps, device)
    rows = []
    for (mode, ratio), seconds in times.items():
        median, eager = statistics.median(seconds), statistics.median(times[("off", ratio)])
        rows.append({"model": name, "batch": batch, "mask_ratio": ratio, "compile": mode,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "s_per_step": round(median, 5),
                     "img_per_s": round(batch / median, 2), "speedup_vs_eager": round(eager / median, 3),
                     "compile_s": round(first[mode] - first["off"], 1) if mode != "off" else 0.0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="XL/2", help="comma-separated presets (maskdit.method.model.MODEL_PRESETS)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mask ratio (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = none)")
    parser.add_argument("--compile", choices=["off", "model", "step"], default="off",
                        help="torch.compile as the training config's `compile` (model: blocks; step: forward + loss)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, time nothing")
    parser.add_argument("--compare-compile", default=None, metavar="MODES",
                        help="e.g. model,step: time eager and these compile modes alternately (first config only)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by card)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compare_compile:
        compare_compile(args.configs.split(",")[0], args.batch, torch.device(args.device), DTYPES[args.dtype],
                        args.compare_compile.split(","), MASK_RATIOS, args.steps, args.warmup)
        return
    run(args)


if __name__ == "__main__":
    sys.exit(main())

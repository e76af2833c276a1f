"""Training-step throughput of MaskDiT: mask ratio 0.5 against 0 in the same run.

    .venv/bin/python benchmarks/throughput.py --configs S/4,demo --batch 32 --steps 5   # CPU
    .venv/bin/python benchmarks/throughput.py --configs XL/2 --batch 64 --flops-only    # any machine
    python benchmarks/throughput.py --configs XL/2 --batch 64 --device cuda --dtype bf16 --compile

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

from maskdit.diffusion import EDMPrecond, maskdit_loss
from maskdit.model import MaskDiT, model_config

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
    """One training step with its own model, optimizer and EMA."""

    def __init__(self, name: str, batch: int, device: torch.device, dtype: torch.dtype | None, compile_: bool):
        cfg = model_config(name)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.precond = EDMPrecond(MaskDiT(cfg)).to(device)
        self.ema = copy.deepcopy(self.precond).requires_grad_(False)
        self.params = [p for p in self.precond.parameters() if p.requires_grad]
        self.ema_params = [p for p in self.ema.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        self.model = torch.compile(self.precond) if compile_ else self.precond
        self.x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)  # (B, C, H, W)
        self.labels = torch.randint(0, cfg.num_classes, (batch,), device=device)  # (B,)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, mask_ratio: float) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = maskdit_loss(self.model, self.x0, self.labels, mask_ratio).loss.mean()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="XL/2", help="comma-separated presets (maskdit.model.MODEL_PRESETS)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mask ratio (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the preconditioned model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, time nothing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by card)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run(args)


if __name__ == "__main__":
    sys.exit(main())

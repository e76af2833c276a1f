"""Every GPU measurement of issue 15 in one run: one JSON and one Markdown table in --out.

    python benchmarks/gpu_suite.py --out bench-h100                 # one GPU: budget 8 minutes (untimed: see docs)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite       # CPU, tiny sizes, seconds: checks the suite

It installs and downloads nothing: random weights everywhere (speed does not depend on them), the
SD-VAE built from its architecture, Inception from the wheel of the project's venv.

Sections (the functions of throughput.py, train_step.py, sampling.py and encode.py):
- train: XL/2, batch 128 a GPU (the pretraining preset's 1024 over 8), bf16 autocast, the trainer's AdamW
  (fused on CUDA) + EMA: eager and both compile modes (`model`, `step`), mask 0.5 and 0, variants
  alternating within each round (medians). s/step is 10 steps back to back between two syncs (the host
  queues work ahead of the GPU, as in training); the per-step-synced figure stands beside it.
- sweep: the fastest masked variant at batch 64 and 256 (an out-of-memory batch is recorded, not fatal).
- profile: torch.profiler over 3 masked steps of that variant: GPU busy share of the wall time, kernels a
  step, time by class (GEMM, attention, elementwise, optimizer, copies), the top kernels.
- reference (with --reference): benchmarks/vs_reference.py, the reference code's step and sampler beside
  ours at the same model, batch and precision. TFLOP/s and MFU use analytic matmul FLOPs
  (throughput.analytic_flops: encoder on L_keep tokens, decoder on all L, backward = 2 x forward) against
  the card's dense bf16 peak (H100 SXM 989 TFLOP/s; --peak-tflops overrides). Memory: the model state
  (weights, grads, AdamW, EMA) plus the step's peak above it = the peak of a lone trainer.
- trainer: `Trainer.train_step` (data, guard, grad norm, EMA) against the bare model step: overhead %.
- sample: EDM Heun with CFG 1.5, fp32 / bf16 / bf16 + compiled network; the 40-step rate is
  batch / (79 x seconds per network call), measured over --sample-steps steps.
- encode: the SD-VAE encoder (diffusers AutoencoderKL, block_out_channels 128/256/512/512, 4 latent
  channels, random weights) at 256 px through `maskdit.data.encodeworker.vae_moments` with fp16 autocast, as
  `maskdit encode` runs on CUDA.
- fid: SD-VAE decode and Inception img/s, the 2048-d square root; FID-50K wall time on 8 GPUs
  = 50000 / 8 x (1/sample + 1/decode + 1/inception) + sqrtm, with the best sampler measured here.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import encode as encode_bench  # noqa: E402
import sampling  # noqa: E402
import train_step  # noqa: E402
from throughput import (  # noqa: E402
    DTYPES,
    PEAK_TFLOPS,
    Step,
    analytic_flops,
    peak_tflops,
    sync,
    time_back_to_back,
    time_interleaved,
)

from maskdit.method.diffusion import EDMPrecond  # noqa: E402
from maskdit.method.model import MaskDiT, model_config  # noqa: E402

FULL = dict(model="XL/2", batch=128, sweep=(64, 256), precision="bf16", steps=10, rounds=3, warmup=2,
            profile_steps=3, sample_batch=32, sample_steps=10, sample_repeats=2, encode_resolution=256,
            encode_batch=64, decode_batch=32, inception_batch=250, trainer_samples=4096, backend="inductor",
            sqrtm=True)
DRY = dict(model="tiny", batch=4, sweep=(2, 8), precision="bf16", steps=2, rounds=1, warmup=1, profile_steps=1,
           sample_batch=2, sample_steps=2, sample_repeats=1, encode_resolution=32, encode_batch=2, decode_batch=2,
           inception_batch=2, trainer_samples=64, backend="eager", sqrtm=False)  # dynamo traces, no code generation


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def state_gb(step: Step) -> float:
    """Weights + grads + AdamW moments (fp32) + EMA of one model: 5 x 4 bytes a parameter."""
    return sum(p.numel() for p in step.params) * 20 / 2**30


def bench_train(s: dict, device: torch.device, modes: list[str], peak: float | None) -> list[dict]:
    """The training step at the pretraining preset's batch a GPU, eager and each compile mode, masked and not.

    `s_per_step`: `steps` steps back to back between two syncs (the host runs ahead of the GPU, as the
    trainer lets it); `s_per_step_synced`: a sync before and after every step (the host idle between
    steps), for comparison with earlier suites. Medians over `rounds`; variants alternate within a round.
    """
    dtype = DTYPES[s["precision"]]
    cfg = model_config(s["model"])
    rows = []
    for mode in ["off", *modes]:  # one variant in memory at a time; eager is timed again beside each compiled one
        variants = {m: Step(s["model"], s["batch"], device, dtype, m, backend=s["backend"])
                    for m in dict.fromkeys(["off", mode])}
        first, step_peak = {}, {}
        for m, step in variants.items():
            start = time.perf_counter()
            for ratio in (0.5, 0.0):
                step(ratio)
            sync(device)
            first[m] = time.perf_counter() - start
            for _ in range(s["warmup"]):
                for ratio in (0.5, 0.0):
                    step(ratio)
            for ratio in (0.5, 0.0):
                step_peak[m, ratio] = _step_peak_gb(step, ratio, device)
        fns = {(m, r): (lambda st=step, r=r: st(r)) for m, step in variants.items() for r in (0.5, 0.0)}
        times = time_back_to_back(fns, s["rounds"], s["steps"], device)
        synced = time_interleaved(fns, s["rounds"], device)
        for (m, ratio), seconds in times.items():
            if mode != "off" and m == "off":
                continue  # the eager rows come from the first round; here eager only paces the comparison
            median = statistics.median(seconds)
            flops = analytic_flops(cfg, s["batch"], ratio)
            rows.append({
                "model": s["model"], "batch": s["batch"], "precision": s["precision"], "compile": m,
                "mask_ratio": ratio, "s_per_step": round(median, 5), "img_per_s": round(s["batch"] / median, 1),
                "s_per_step_synced": round(statistics.median(synced[m, ratio]), 5),
                "eager_s_per_step_same_round": round(statistics.median(times["off", ratio]), 5),
                "compile_s": round(first[m] - first["off"], 1) if m != "off" else 0.0,
                "gflop_per_step": float(f"{flops['total'] / 1e9:.4g}"),
                "decoder_flop_share": round(flops["decoder"] / flops["total"], 3),
                "tflops": float(f"{flops['total'] / median / 1e12:.4g}"),
                "mfu": float(f"{flops['total'] / median / 1e12 / peak:.4g}") if peak else None,
                "state_gb": round(state_gb(variants[m]), 2), "step_peak_gb": round(step_peak[m, ratio], 2),
            })
        del variants, fns
        _free(device)
    for m in ["off", *modes]:
        by = {r["mask_ratio"]: r for r in rows if r["compile"] == m}
        if 0.5 in by and 0.0 in by:
            by[0.5]["masked_vs_unmasked_time"] = round(by[0.5]["s_per_step"] / by[0.0]["s_per_step"], 3)
    return rows


def bench_sweep(s: dict, device: torch.device, mode: str, peak: float | None) -> list[dict]:
    """The masked step at other batches a GPU (back to back, `mode`); a batch that does not fit is a row with
    `oom`, not the end of the suite."""
    dtype = DTYPES[s["precision"]]
    cfg = model_config(s["model"])
    rows = []
    for batch in s["sweep"]:
        row = {"model": s["model"], "batch": batch, "precision": s["precision"], "compile": mode, "mask_ratio": 0.5}
        try:
            step = Step(s["model"], batch, device, dtype, mode, backend=s["backend"])
            for _ in range(1 + s["warmup"]):
                step(0.5)
            seconds = statistics.median(time_back_to_back({"step": lambda: step(0.5)}, s["rounds"], s["steps"],
                                                          device)["step"])
        except torch.OutOfMemoryError as error:
            rows.append({**row, "oom": True, "error": str(error).splitlines()[0][:200]})
        else:
            flops = analytic_flops(cfg, batch, 0.5)["total"]
            rows.append({**row, "oom": False, "s_per_step": round(seconds, 5), "img_per_s": round(batch / seconds, 1),
                         "tflops": float(f"{flops / seconds / 1e12:.4g}"),
                         "mfu": float(f"{flops / seconds / 1e12 / peak:.4g}") if peak else None})
        finally:
            step = None
            _free(device)
    return rows


KERNEL_CLASSES = (  # (class, name pattern), first match wins; CUDA kernel names and, on the CPU, aten op names
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|softmax", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|lerp", re.I)),
    ("GEMM", re.compile(r"gemm|matmul|xmma|cutlass|cublas|sm90_|aten::(mm|addmm|bmm|linear|baddbmm)$", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy|aten::(to|_to_copy|contiguous|clone|cat)$", re.I)),
)


def kernel_class(name: str) -> str:
    return next((label for label, pattern in KERNEL_CLASSES if pattern.search(name)), "elementwise")


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def bench_profile(s: dict, device: torch.device, mode: str) -> dict:
    """torch.profiler over `profile_steps` back-to-back masked steps of `mode`: the GPU's busy share of the
    wall time, kernels per step, time by class (GEMM / attention / elementwise / optimizer / copies) and the
    top kernels. On the CPU (dry run) the same from aten ops' self time."""
    from torch.profiler import ProfilerActivity, profile

    step = Step(s["model"], s["batch"], device, DTYPES[s["precision"]], mode, backend=s["backend"])
    for _ in range(1 + s["warmup"]):
        step(0.5)
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(s["profile_steps"]):
            step(0.5)
        sync(device)
        wall = time.perf_counter() - start
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in kernels]  # us -> s
        by_name: dict[str, float] = {}
        for e, (a, b) in zip(kernels, spans):
            by_name[e.name] = by_name.get(e.name, 0.0) + (b - a)
        busy = _busy_seconds(spans)
        count = len(kernels)
    else:
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        by_name = {e.key: e.self_cpu_time_total / 1e6 for e in ops}
        busy, count = sum(by_name.values()), sum(e.count for e in ops)
    classes: dict[str, float] = {}
    for name, seconds in by_name.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + seconds
    total = sum(by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    del step
    _free(device)
    return {"compile": mode, "batch": s["batch"], "steps": s["profile_steps"], "unit": "CUDA kernels" if cuda
            else "aten ops (CPU self time)", "wall_s_per_step": round(wall / s["profile_steps"], 5),
            "busy_fraction": round(busy / wall, 3), "kernels_per_step": round(count / s["profile_steps"], 1),
            "time_share_by_class": {k: round(v / total, 3) for k, v in sorted(classes.items())},
            "top": [{"name": n[:120], "share": round(v / total, 3), "class": kernel_class(n)} for n, v in top]}


def _step_peak_gb(step: Step, ratio: float, device: torch.device) -> float:
    """Memory a step allocates above what is resident before it (activations, gradients, temporaries)."""
    if device.type != "cuda":
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(ratio)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def bench_sample(s: dict, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    precond = EDMPrecond(MaskDiT(model_config(s["model"]))).to(device).eval().requires_grad_(False)
    calls = 2 * s["sample_steps"] - 1
    variants = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
    fns, compile_s = {}, {}
    for name, (precision, compiled) in variants.items():
        if compiled and s["backend"] != "inductor":  # the dry run: dynamo without code generation
            net = torch.compile(precond, backend=s["backend"])
            fn = sampling.sampler_fn(net, s["sample_batch"], s["sample_steps"], 1.5, precision)
        else:
            fn = sampling.sampler_fn(precond, s["sample_batch"], s["sample_steps"], 1.5, precision, compiled)
        start = time.perf_counter()
        fn()  # warm-up, compilation
        sync(device)
        compile_s[name] = time.perf_counter() - start
        fns[name] = fn
    times = time_interleaved(fns, s["sample_repeats"], device)
    gflop = sampling.network_gflop_per_img(precond, 40)
    rows = []
    for name, seconds in times.items():
        per_call = statistics.median(seconds) / calls
        rows.append({"model": s["model"], "variant": name, "batch": s["sample_batch"], "cfg_scale": 1.5,
                     "timed_steps": s["sample_steps"], "s_per_network_call": round(per_call, 5),
                     "img_per_s_40_steps": round(s["sample_batch"] / (79 * per_call), 3),
                     "first_call_s": round(compile_s[name], 1), "gflop_per_img_40_steps": round(gflop, 1)})
    del precond, fns
    _free(device)
    return rows


def bench_encode(s: dict, device: torch.device, vae) -> dict:
    autocast = torch.float16 if device.type == "cuda" else None  # `maskdit encode`'s default on CUDA
    img_s = encode_bench.encode_img_s(vae, s["encode_resolution"], s["encode_batch"], device, autocast)
    return {"resolution": s["encode_resolution"], "batch": s["encode_batch"],
            "autocast": "fp16" if autocast else "fp32", "vae_encode_img_s": round(img_s, 2)}


def bench_fid(s: dict, device: torch.device, vae, sample_img_s: float) -> dict:
    latent = s["encode_resolution"] // 8
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        decode = sampling.decode_img_s(vae, latent, s["decode_batch"], 2, 1, device)
    inception = sampling.inception_img_s(s["encode_resolution"], s["inception_batch"], 2, device, s.get("inception"))
    sqrtm = sampling.sqrtm_s() if s["sqrtm"] else 0.0
    return {"decode_img_s": round(decode, 2), "decode_autocast": "bf16" if device.type == "cuda" else "fp32",
            "inception_img_s": round(inception, 2), "sqrtm_s": round(sqrtm, 2) if s["sqrtm"] else "skipped",
            "sample_img_s": sample_img_s,
            "fid50k_8gpu_s": round(sampling.fid50k_seconds(sample_img_s, decode, inception, sqrtm), 1)}


def markdown(result: dict) -> str:
    dev, lines = result["device"], []
    lines += [f"# GPU suite: {dev}", "", f"torch {result['torch']}, {result['mode']}, total {result['total_s']} s", ""]
    lines += ["## Training step", "", "| model | batch | precision | compile | mask | s/step | synced s/step | img/s "
              "| GFLOP/step | TFLOP/s | MFU | masked/unmasked time | compile s | state GB | step peak GB |",
              "|" + "---|" * 15]
    for r in result["train"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['compile']} | {r['mask_ratio']} | "
                     f"{r['s_per_step']} | {r['s_per_step_synced']} | {r['img_per_s']} | {r['gflop_per_step']} | "
                     f"{r['tflops']} | {mfu} | "
                     f"{r.get('masked_vs_unmasked_time', '')} | {r['compile_s']} | {r['state_gb']} | "
                     f"{r['step_peak_gb']} |")
    lines += ["", "s/step: steps back to back between two syncs; synced: a sync around every step.", ""]
    lines += ["## Batch sweep (masked step)", "", "| batch | compile | s/step | img/s | TFLOP/s | MFU |",
              "|---|---|---|---|---|---|"]
    for r in result["sweep"]:
        if r["oom"]:
            lines.append(f"| {r['batch']} | {r['compile']} | out of memory | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
            lines.append(f"| {r['batch']} | {r['compile']} | {r['s_per_step']} | {r['img_per_s']} | {r['tflops']} | "
                         f"{mfu} |")
    p = result["profile"]
    lines += ["", f"## Profile of the masked step (compile {p['compile']}, batch {p['batch']}, {p['unit']})", "",
              f"busy {100 * p['busy_fraction']:.1f} % of the wall time, {p['kernels_per_step']} kernels a step; "
              "time by class: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in p["time_share_by_class"].items()),
              "", "| kernel | share | class |", "|---|---|---|"]
    lines += [f"| `{k['name']}` | {100 * k['share']:.1f} % | {k['class']} |" for k in p["top"]]
    t = result["trainer"]
    lines += ["", "## Trainer overhead", "", "| model | batch | precision | trainer s/step | bare s/step | overhead |",
              "|---|---|---|---|---|---|",
              f"| {t['model']} | {t['global_batch']} | {t['precision']} | {t['trainer_s_per_step']} | "
              f"{t['bare_s_per_step']} | {t['overhead_pct']} % |"]
    lines += ["", "## Sampling (40 Heun steps, CFG 1.5)", "",
              "| variant | batch | s/network call | img/s | first call s |", "|---|---|---|---|---|"]
    for r in result["sample"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['s_per_network_call']} | {r['img_per_s_40_steps']} | "
                     f"{r['first_call_s']} |")
    e, f = result["encode"], result["fid"]
    lines += ["", "## Encoding and FID-50K", "", "| measurement | value |", "|---|---|",
              f"| SD-VAE encode, {e['resolution']} px, batch {e['batch']}, {e['autocast']} | "
              f"{e['vae_encode_img_s']} img/s |",
              f"| SD-VAE decode | {f['decode_img_s']} img/s |", f"| Inception pool3 | {f['inception_img_s']} img/s |",
              f"| 2048-d sqrtm | {f['sqrtm_s']} s |", f"| sampler used (best above) | {f['sample_img_s']} img/s |",
              f"| **FID-50K on 8 GPUs (projected)** | **{f['fid50k_8gpu_s']} s = {f['fid50k_8gpu_s'] / 60:.1f} min** |"]
    if "reference" in result:
        lines += ["", "## Against the reference code (vs_reference.py, same run)", "", "```json",
                  json.dumps(result["reference"], indent=1), "```"]
    lines += ["", "Section wall times: " + ", ".join(f"{k} {v} s" for k, v in result["section_s"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for suite.json and suite.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model and sizes, no code generation")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--compile-modes", default="model,step", help="compiled training variants: model,step")
    parser.add_argument("--reference", default=None, help="a checkout of Anima-Lab/MaskDiT: time its step and "
                        "sampler beside ours (benchmarks/vs_reference.py) in the same run")
    parser.add_argument("--timm", default=None, help="a folder holding timm for --reference (pip install --no-deps "
                        "--target DIR timm)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card)")
    parser.add_argument("--inception", default=None,
                        help="Inception TorchScript file (default: the bundled one; its speed does not depend on it)")
    args = parser.parse_args(argv)
    s = dict(DRY if args.dry_run else FULL, inception=args.inception)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    peak = peak_tflops(device, args.peak_tflops) or (PEAK_TFLOPS["H100"] if args.dry_run else None)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "mode": "dry run (tiny sizes, CPU)" if args.dry_run else "full",
              "settings": s, "peak_tflops": peak, "section_s": {}}
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def section(name, fn, *a):
        t0 = time.perf_counter()
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        result[name] = fn(*a)
        # the trainer sets TF32 for bf16 runs process-wide; every section starts from the suite's setting
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        result["section_s"][name] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_suite] {name}: {result['section_s'][name]} s", file=sys.stderr, flush=True)
        # what is measured so far survives a run stopped by its time limit
        (out / "suite.partial.json").write_text(json.dumps(result, indent=1))

    section("train", bench_train, s, device, args.compile_modes.split(","), peak)
    masked = [r for r in result["train"] if r["mask_ratio"] == 0.5]
    best = min(masked, key=lambda r: r["s_per_step"])["compile"]  # the fastest masked step: swept and profiled
    section("sweep", bench_sweep, s, device, best, peak)
    section("profile", bench_profile, s, device, best)
    section("trainer", lambda: train_step.overhead(s["model"], s["batch"], s["precision"], 0.5, s["steps"],
                                                   s["warmup"], s["trainer_samples"], device.type))
    _free(device)
    section("sample", bench_sample, s, device)
    vae = sampling.sd_vae(device, torch.float32)  # one SD-VAE for encoding and decoding
    section("encode", bench_encode, s, device, vae)
    best_sampler = max(r["img_per_s_40_steps"] for r in result["sample"])
    section("fid", bench_fid, s, device, vae, best_sampler)
    del vae
    _free(device)
    if args.reference:  # the reference code's step and sampler beside ours, in this same process and device call
        import vs_reference

        section("reference", vs_reference.main, [
            "--reference", args.reference, *(["--timm", args.timm] if args.timm else []), "--config", s["model"],
            "--batch", str(s["batch"]), "--precision", s["precision"], "--steps", str(s["steps"]),
            "--warmup", str(s["warmup"]), "--sample-batch", str(s["sample_batch"]),
            "--sample-steps", str(s["sample_steps"]), "--device", str(device)])
    result["total_s"] = round(time.perf_counter() - start, 1)
    (out / "suite.partial.json").unlink()
    (out / "suite.json").write_text(json.dumps(result, indent=1))
    (out / "suite.md").write_text(markdown(result))
    print(json.dumps({"json": str(out / "suite.json"), "markdown": str(out / "suite.md"),
                      "total_s": result["total_s"]}))
    return result


if __name__ == "__main__":
    main()

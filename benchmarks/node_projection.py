"""What the pipeline's evaluate and encode jobs take on one node of G GPUs, projected from measured rates.

    python benchmarks/node_projection.py --device cuda --out node.json        # on one GPU of the node type
    .venv/bin/python benchmarks/node_projection.py --dry-run --out node.json  # tiny sizes, CPU: the code path

The evaluate job (`maskdit evaluate` under torchrun, components/stepjobs.py) gives each of its G
ranks whole batches of the N images; each rank samples (EDM Heun, 40 steps, CFG), decodes with the
SD-VAE and takes Inception features, then rank 0 gathers the N x 2048 features and computes the
statistics and the FID. So, per sampler precision p,

    fid_s(p) = N / G * (1 / sample_img_s(p) + 1 / decode_img_s + 1 / inception_img_s)
               + first_call_s(p) + gather_s(G, N) + stats_s(N)

with the per-GPU rates measured here on one GPU, the gather measured with G processes over gloo
(what the job's ranks do: `gather_by_index`) and the statistics (mean, covariance, 2048-d square
root) measured on N features. The encode job gives each rank whole shards; a rank decodes its JPEGs
in `workers` threads while the VAE runs, so

    encode_s = images / min(G * vae_encode_img_s, min(cpus, G * workers) * jpeg_img_s_per_thread)

and the smaller term says whether JPEG decoding starves the GPUs. Everything is a projection from
per-GPU rates, not a measurement of the job: the JSON says so (`kind`). One JSON object is printed
and written to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sampling import decode_img_s, inception_img_s, sampler_fn, sd_vae, timed  # noqa: E402

FID_SAMPLES = 50_000
IMAGENET_IMAGES = 1_281_167
PRECISIONS = {"fp32": ("fp32", False), "tf32": ("tf32", False), "bf16": ("bf16", False),
              "bf16+compile": ("bf16", True)}


# --------------------------------------------------------------------------------------------
# The projection (pure arithmetic: tests check it)
# --------------------------------------------------------------------------------------------

def project_fid(sample_img_s: float, decode: float, inception: float, gather_s: float, stats_s: float,
                first_call_s: float = 0.0, gpus: int = 8, n: int = FID_SAMPLES) -> float:
    """Seconds of the evaluate job on `gpus` GPUs from per-GPU img/s rates (module docstring)."""
    return n / gpus * (1 / sample_img_s + 1 / decode + 1 / inception) + first_call_s + gather_s + stats_s


def project_encode(vae_encode_img_s: float, jpeg_img_s_per_thread: float, gpus: int = 8, cpus: int = 80,
                   workers: int = 8, images: int = IMAGENET_IMAGES) -> dict:
    """Seconds of the encode job on `gpus` GPUs, and which side bounds it (module docstring)."""
    gpu_rate = gpus * vae_encode_img_s
    cpu_rate = min(cpus, gpus * workers) * jpeg_img_s_per_thread
    return {"seconds": images / min(gpu_rate, cpu_rate), "gpu_img_s": gpu_rate, "jpeg_decode_img_s": cpu_rate,
            "bound_by": "gpu" if gpu_rate <= cpu_rate else "jpeg decoding (cpu)"}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def sample_rate(precond, batch: int, steps: int, precision: str, compile_: bool, device) -> tuple[float, float]:
    """(img/s at 40 Heun steps, seconds of the first call) for one precision: `steps` measured, scaled by calls."""
    fn = sampler_fn(precond, batch, steps, 1.5, precision, compile_)
    start = time.perf_counter()
    with torch.no_grad():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - start
        seconds = timed(fn, 2, 1, device)
    return batch / (seconds * (2 * 40 - 1) / (2 * steps - 1)), first


def jpeg_rate(resolution: int, count: int) -> float:
    """img/s of one thread decoding ImageNet-like JPEGs (500 x 375) and taking the ADM crop (`load_image`)."""
    from PIL import Image

    from maskdit.data.images import load_image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    start = time.perf_counter()
    for blob in blobs:
        load_image(blob, resolution)
    return count / (time.perf_counter() - start)


def _gather_worker(rank: int, world: int, n: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from maskdit.evaluation.sample import gather_by_index, rank_indices

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    idx = rank_indices(n, rank, world, 250)
    mine = torch.randn(len(idx), 2048)  # (n / W, 2048) float32: this rank's features
    dist.barrier()
    start = time.perf_counter()
    gather_by_index(mine, idx, n, rank, world)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start}))
    dist.destroy_process_group()


def gather_seconds(world: int, n: int) -> float:
    """Seconds to gather n x 2048 float32 features from `world` gloo processes onto rank 0 (as the job does)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gather.json")
        mp.spawn(_gather_worker, args=(world, n, f"file://{tmp}/rendezvous", out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())["seconds"]


def stats_seconds(n: int) -> float:
    """Seconds of the statistics rank 0 computes from n features: mean, covariance, FID (2048-d square root)."""
    from maskdit.evaluation import fid

    feats = np.random.default_rng(0).standard_normal((n, 2048)).astype(np.float32)
    ref = fid.feature_stats(np.random.default_rng(1).standard_normal((min(n, 4096), 2048)))
    start = time.perf_counter()
    fid.fid_from_stats(fid.feature_stats(feats), ref)
    return time.perf_counter() - start


def measure(args) -> dict:
    from maskdit.data.encodeworker import vae_moments
    from maskdit.method.diffusion import EDMPrecond
    from maskdit.method.model import MaskDiT, model_config

    device = torch.device(args.device)
    precond = EDMPrecond(MaskDiT(model_config(args.config))).to(device).eval().requires_grad_(False)
    samples = {}
    for name, (precision, compile_) in PRECISIONS.items():
        if device.type != "cuda" and (compile_ or precision == "tf32"):
            samples[name] = None  # tf32 is a CUDA setting; compiling needs a C compiler: GPU only
            continue
        rate, first = sample_rate(precond, args.batch, args.steps, precision, compile_, device)
        samples[name] = {"img_per_s_40_steps": rate, "first_call_s": first}
    del precond
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = sd_vae(device, dtype)
    decode = decode_img_s(vae, args.resolution // 8, args.batch, 2, 1, device)
    vae = sd_vae(device, torch.float32)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1  # (B, 3, H, W)
    autocast = torch.float16 if device.type == "cuda" else None
    with torch.no_grad():
        encode = args.batch / timed(lambda: vae_moments(vae, x, autocast), 2, 1, device)
    del vae
    return {"sample": samples, "decode_img_s": decode,
            "inception_img_s": inception_img_s(args.resolution, args.inception_batch, 2, device),
            "vae_encode_img_s": encode, "jpeg_img_s_per_thread": jpeg_rate(args.resolution, args.jpegs),
            "gather_s": gather_seconds(args.gather_world, args.n), "gather_world": args.gather_world,
            "stats_s": stats_seconds(args.n)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code, times nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the node projected")
    parser.add_argument("--cpus", type=int, default=80, help="CPUs of the job's pod (cpu_request)")
    parser.add_argument("--workers", type=int, default=8, help="`maskdit encode` decoding threads a rank")
    parser.add_argument("--out", type=Path, default=Path("node_projection.json"))
    args = parser.parse_args(argv)
    full = dict(config="XL/2", batch=64, steps=4, resolution=256, inception_batch=250, jpegs=200, n=FID_SAMPLES,
                gather_world=min(args.gpus, os.cpu_count() or 1))
    tiny = dict(config="tiny", batch=2, steps=2, resolution=32, inception_batch=2, jpegs=4, n=600, gather_world=2,
                device="cpu")
    for key, value in (tiny if args.dry_run else full).items():
        setattr(args, key, value)
    measured = measure(args)
    fid = {name: None if rates is None else round(project_fid(
        rates["img_per_s_40_steps"], measured["decode_img_s"], measured["inception_img_s"], measured["gather_s"],
        measured["stats_s"], rates["first_call_s"], args.gpus, FID_SAMPLES), 1)
        for name, rates in measured["sample"].items()}
    result = {
        "kind": "dry run (tiny sizes, CPU): not a projection" if args.dry_run else
                "projection from per-GPU rates measured on one GPU (not a measurement of the job)",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "config": args.config,
        "gpus": args.gpus, "cpus": args.cpus, "workers": args.workers, "measured": measured,
        "gather_note": f"{measured['gather_world']} gloo processes on this machine gathering {args.n} x 2048 features",
        "fid50k_s": fid, "fid50k_min": {k: None if v is None else round(v / 60, 1) for k, v in fid.items()},
        "encode_imagenet": {k: round(v, 1) if isinstance(v, float) else v for k, v in project_encode(
            measured["vae_encode_img_s"], measured["jpeg_img_s_per_thread"], args.gpus, args.cpus,
            args.workers).items()},
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

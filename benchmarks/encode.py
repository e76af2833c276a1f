"""Benchmark of the data path: encoding images/s, and shard reads from a local S3 server.

    .venv/bin/python benchmarks/encode.py                       # CPU: tiny random VAE, 64 px
    .venv/bin/python benchmarks/encode.py --vae DIR --resolution 256 --batch-size 64 --device cuda

Prints one JSON object. Encoding: synthetic JPEGs (ImageNet-like 500x375) through the whole
`maskdit encode` path (decode, ADM crop, VAE, shard write); the first call (VAE load, warm-up) is
excluded. Shard reads: float16 (mean, logvar) shards, 4x32x32 each (ImageNet-256 with the SD VAE), on a
SeaweedFS server started on loopback, fetched and checksummed by `load_dataset` into a fresh cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskdit.data import latents, shards
from maskdit.data.encode import encode
from maskdit.data.encodeworker import vae_moments


def tiny_vae(path: Path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(path)
    return str(path)


def make_images(root: Path, count: int, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(folder / f"{i:05d}.jpg", quality=90)


def bench_encode(work: Path, args) -> dict:
    vae = args.vae or tiny_vae(work / "vae")
    make_images(work / "images", args.images)
    kw = dict(vae=vae, resolution=args.resolution, batch_size=args.batch_size, shard_size=args.images,
              device=args.device, workers=args.workers, progress=False)
    make_images(work / "warm", args.batch_size)
    encode(str(work / "warm"), str(work / "warm-out"), **kw)  # VAE load, allocator, kernels
    start = time.perf_counter()
    encode(str(work / "images"), str(work / "out"), **kw)
    seconds = time.perf_counter() - start
    return {"images": args.images, "resolution": args.resolution, "batch_size": args.batch_size,
            "vae": "tiny random AutoencoderKL (8/16 channels)" if not args.vae else args.vae,
            "device": args.device, "seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 1)}


def encode_img_s(vae, resolution: int, batch: int, device: torch.device, autocast: torch.dtype | None,
                 repeats: int = 3, warmup: int = 1) -> float:
    """img/s of the VAE encoder alone (`maskdit.data.encodeworker.vae_moments`, as `maskdit encode` calls it) on random
    images in [-1, 1]: the GPU part of encoding, without JPEG decoding and cropping."""
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1  # (B, 3, H, W)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            vae_moments(vae, x, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def bench_reads(work: Path, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures.s3 import run_seaweedfs

    with run_seaweedfs(work / "seaweedfs") as server:
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="bench")
        uri = "s3://bench/latents"
        g = torch.Generator().manual_seed(0)
        infos = []
        for k in range(args.shards):
            mean = torch.randn((args.shard_samples, 4, 32, 32), generator=g).half()
            infos.append(shards.write_shard(uri, k, {"mean": mean, "logvar": mean.clone() - 8, "labels":
                                                     torch.zeros(args.shard_samples, dtype=torch.long)}))
        count = args.shards * args.shard_samples
        shards.write_manifest(uri, shards.Manifest(
            space="latent", count=count, images=count, channels=4, resolution=256, shape=(4, 32, 32),
            dtype="float16", scale_factor=0.18215, vae="bench", class_names=["a", "b"],
            shard_size=args.shard_samples, shards=infos))
        total = sum(i.bytes for i in infos)
        start = time.perf_counter()
        data = latents.load_dataset(uri, cache_dir=work / "cache")
        fetch = time.perf_counter() - start
        start = time.perf_counter()
        latents.load_dataset(uri, cache_dir=work / "cache")
        cached = time.perf_counter() - start
        idx = torch.randint(0, count, (args.draw_batch,), generator=g)
        data.draw(idx)
        times = []
        for _ in range(21):
            idx = torch.randint(0, count, (args.draw_batch,), generator=g)
            start = time.perf_counter()
            data.draw(idx)
            times.append(time.perf_counter() - start)
        draw = sorted(times)[10]  # median: robust to other jobs on the machine
    return {"shards": args.shards, "shard_mb": round(infos[0].bytes / 2**20, 1), "total_mb": round(total / 2**20, 1),
            "fetch_verify_s": round(fetch, 2), "fetch_verify_mb_per_s": round(total / 2**20 / fetch, 1),
            "reload_cached_s": round(cached, 3), "draw_batch": args.draw_batch,
            "draw_median_ms": round(draw * 1000, 2), "draw_samples_per_s": round(args.draw_batch / draw),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="AutoencoderKL directory (default: a tiny random one)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-samples", type=int, default=2048, help="(mean, logvar) 4x32x32 float16: 32 MiB a shard")
    parser.add_argument("--draw-batch", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maskdit-bench-") as tmp:
        work = Path(tmp)
        result = {"torch": torch.__version__, "cpus": os.cpu_count(),
                  "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "encode": bench_encode(work, args), "shard_reads": bench_reads(work, args)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

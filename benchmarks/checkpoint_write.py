"""How long a training checkpoint takes to write: to a local S3 server (SeaweedFS) and to local disk.

    .venv/bin/python benchmarks/checkpoint_write.py                 # XL/2, or a smaller model when it does not fit
    .venv/bin/python benchmarks/checkpoint_write.py --measure B/2   # measure B/2, extrapolate to XL/2 by bytes

Prints one JSON object. The state is what the trainer saves (model, EMA, AdamW's two moments, all
float32, random weights) and goes through `checkpoint.save_checkpoint`, the trainer's own path:
`torch.save` into memory, then one atomic write (S3 multipart upload; temp file + fsync + rename).
So the process needs about twice the state in RAM. When the asked model does not fit in half the
available memory, a smaller preset is measured and the times are scaled to the asked model's bytes
(linear in bytes: both writes stream at a steady rate once past the first part), and the JSON says so.
Use it to size `checkpoint.grace_period_s` and the pod's terminationGracePeriodSeconds (docs/operating.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.s3 import run_seaweedfs  # noqa: E402

from maskdit.core import storage
from maskdit.method import checkpoint  # noqa: E402
from maskdit.method.model import MaskDiT, model_config  # noqa: E402

GB = 1e9
FALLBACKS = ("XL/2", "L/2", "B/2", "S/2")


def parameter_count(preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MaskDiT(model_config(preset)).parameters())


def state_bytes(preset: str) -> int:
    """Bytes of the float32 tensors a checkpoint holds: model, EMA, AdamW exp_avg and exp_avg_sq."""
    return 4 * 4 * parameter_count(preset)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def training_state(preset: str) -> dict:
    """A checkpoint dict shaped as `Trainer.state()` writes it, with random weights and AdamW moments."""
    torch.manual_seed(0)
    cfg = model_config(preset)
    net = MaskDiT(cfg)
    ema = MaskDiT(cfg).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # allocates exp_avg and exp_avg_sq
    optimizer.zero_grad(set_to_none=True)
    return {"model_config": cfg.model_dump(), "model": net.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": None, "step": 1,
            "rng": {"torch": torch.get_rng_state(), "cuda": []}, "data_position": {}, "skipped_steps": 0,
            "tracking_run_id": None, "train_config": {}}


def timed_writes(dir_uri: str, state: dict, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        state["step"] = i + 1
        start = time.perf_counter()
        checkpoint.save_checkpoint(dir_uri, state, keep_last=1)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="XL/2", help="the model to report (default XL/2)")
    parser.add_argument("--measure", default=None, help="the preset to build and write; default: --model if "
                        "twice its state fits in half the available memory, else the largest of L/2, B/2, S/2 that does")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the disk writes and SeaweedFS (default: a temp dir)")
    args = parser.parse_args()

    memory = available_memory()
    measure = args.measure or next(p for p in (args.model, *FALLBACKS)
                                   if 2.2 * state_bytes(p) < memory / 2 or p == FALLBACKS[-1])
    state = training_state(measure)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        serialize, size = serialized(state)
        disk = timed_writes(str(work / "disk"), state, args.repeats)
        with run_seaweedfs(work / "seaweedfs") as server:
            os.environ.update(server.env())
            server.client().create_bucket(Bucket="bench")
            s3 = timed_writes("s3://bench/ckpt", state, args.repeats)
            storage.delete(checkpoint.checkpoint_uri("s3://bench/ckpt", args.repeats))

    scale = state_bytes(args.model) / state_bytes(measure)
    result = {
        "model": args.model, "measured": measure, "extrapolated": measure != args.model,
        "parameters": parameter_count(args.model), "measured_parameters": parameter_count(measure),
        "size_gb": round(size * scale / GB, 2), "measured_size_gb": round(size / GB, 3),
        "serialize_s": round(serialize * scale, 1),
        "disk_write_s": round(statistics.median(disk) * scale, 1),
        "s3_write_s": round(statistics.median(s3) * scale, 1),
        "measured_disk_s": [round(t, 2) for t in disk], "measured_s3_s": [round(t, 2) for t in s3],
        "s3_gb_per_s": round(size / GB / statistics.median(s3), 3),
        "disk_gb_per_s": round(size / GB / statistics.median(disk), 3),
        "cpu_cores": os.cpu_count(), "available_memory_gb": round(memory / GB, 1), "torch": torch.__version__,
        "note": "write = torch.save to memory + atomic write (save_checkpoint); median of the repeats",
    }
    print(json.dumps(result, indent=1))


def serialized(state: dict) -> tuple[float, int]:
    """(seconds, bytes) of `torch.save` into memory, the first half of every write."""
    import io

    buffer = io.BytesIO()
    start = time.perf_counter()
    torch.save(state, buffer)
    return time.perf_counter() - start, buffer.tell()


if __name__ == "__main__":
    main()

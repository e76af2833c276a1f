"""What a training checkpoint costs, old format against new, in one run: to local disk and to SeaweedFS.

    .venv/bin/python benchmarks/checkpoint_write.py --models B/2 XL/2 --out ckpt.json   # on a quiet machine
    .venv/bin/python benchmarks/checkpoint_write.py --dry-run --out ckpt.json           # tiny, seconds (a test)

The state is what the trainer saves (model, EMA, AdamW's two moments, all float32, random weights), on
`--device` (cuda: staged through pinned buffers, as in training). Each format goes through the trainer's
own code:
- file (old, `checkpoint.format: file`): `checkpoint.save_checkpoint`, torch.save into memory, then one
  atomic write; the loop waits for all of it;
- sharded (new, the default): `BackgroundCheckpointer.save` stages the state in host memory (the loop's
  stall) and uploads it in a thread (streamed; multipart on S3) until the commit marker is written.
  Measured as one rank, which stages everything: with N ranks each stages and writes 1/N in parallel.

For each (model, store, format): `stall_s` (what the training loop waits), `total_s` (until the
checkpoint counts), medians of `--repeats`; `peak_extra_rss_gb`, the most resident memory above the
level before a save (sampled every 5 ms; sharded keeps its staging buffers from the first save on, so
that one counts). A model whose state does not fit three times in the
available memory is skipped and the JSON says so. docs/benchmarks.md has the numbers and what they
mean for `checkpoint.every` and `checkpoint.grace_period_s` (docs/operating.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.s3 import run_seaweedfs
from host import loadavg

from maskdit.method import checkpoint
from maskdit.method.model import MaskDiT, model_config
from maskdit.train.background import BackgroundCheckpointer

GB = 1e9


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


def training_state(preset: str, device: str = "cpu") -> dict:
    """A checkpoint dict shaped as `Trainer.state()` writes it, with random weights and AdamW moments."""
    torch.manual_seed(0)
    cfg = model_config(preset)
    net = MaskDiT(cfg).to(device)
    ema = MaskDiT(cfg).to(device).requires_grad_(False)
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


class PeakRss:
    """The process's peak resident memory above its level at entry, sampled every 5 ms in a thread."""

    def __enter__(self) -> Self:
        import psutil

        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(fmt: str, dir_uri: str, state: dict, repeats: int) -> dict:
    """Medians of stall, total time and peak extra memory of `repeats` checkpoints in format `fmt`."""
    stalls, totals, peaks = [], [], []
    writer = BackgroundCheckpointer(dir_uri, rank=0, world=1, keep_last=1)
    for i in range(repeats):
        state["step"] = i + 1
        with PeakRss() as rss:
            start = time.perf_counter()
            if fmt == "file":
                checkpoint.save_checkpoint(dir_uri, state, keep_last=1)
                stall = time.perf_counter() - start
            else:
                writer.save(state, f"{i:032x}")
                stall = writer.stall_s
                writer.wait()
            total = time.perf_counter() - start
        stalls.append(stall)
        totals.append(total)
        peaks.append(rss.extra)
    return {"stall_s": round(statistics.median(stalls), 3), "total_s": round(statistics.median(totals), 3),
            "peak_extra_rss_gb": round(max(peaks) / GB, 3),  # the first save's: sharded keeps its staging buffers
            "stalls_s": [round(t, 3) for t in stalls], "totals_s": [round(t, 3) for t in totals]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["B/2", "XL/2"], help="presets to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the state lives (cpu, cuda)")
    parser.add_argument("--work", default=None, help="folder for the disk writes and SeaweedFS (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset, one repeat: proves it works")
    args = parser.parse_args(argv)
    models, repeats = (["tiny"], 1) if args.dry_run else (args.models, args.repeats)

    rows, skipped, load_before = [], {}, loadavg()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp, run_seaweedfs(Path(tmp) / "seaweedfs") as server:
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="bench")
        for preset in models:
            need, memory = 3 * state_bytes(preset), available_memory()
            if need > memory:
                skipped[preset] = f"needs ~{need / GB:.1f} GB, {memory / GB:.1f} GB available"
                continue
            state = training_state(preset, args.device)
            for store, root in (("disk", str(Path(tmp) / "disk")), ("s3", "s3://bench")):
                for fmt in ("file", "sharded"):
                    row = measure(fmt, f"{root}/{preset.replace('/', '')}-{fmt}", state, repeats)
                    rows.append({"model": preset, "store": store, "format": fmt,
                                 "state_gb": round(state_bytes(preset) / GB, 3), **row})
            del state
    for row in rows:
        if row["format"] == "sharded":
            old = next(r for r in rows if r["format"] == "file" and r["model"] == row["model"]
                       and r["store"] == row["store"])
            row["stall_vs_file"] = round(old["stall_s"] / max(row["stall_s"], 1e-9), 1)
    result = {"mode": "dry run (tiny)" if args.dry_run else "measured", "device": args.device, "repeats": repeats,
              "rows": rows, "skipped": skipped, "cpu_cores": os.cpu_count(),
              "available_memory_gb": round(available_memory() / GB, 1), "torch": torch.__version__,
              "loadavg_before": load_before, "loadavg_after": loadavg(),
              "note": "one rank; stall = what the loop waits; total = until the checkpoint counts; medians"}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

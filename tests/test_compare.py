"""`maskdit compare` at a tiny size: both arms give curves at the same wall-clock points, a plot and a JSON.

Data: scikit-learn's 8x8 digits as a pixel-space dataset (1 channel, 10 classes), a training
split and a held-out one; the "tiny" model on 8x8x1 (16 tokens); a budget of a few seconds.
FID is computed by the real code path (features, statistics, Frechet distance) but with a small
random TorchScript feature network (64-d) in place of the 87 MB Inception (2,048-d): on a shared
2-core CPU the bundled network costs about 0.4 s an image and each 2,048-d Frechet distance
seconds, minutes for this test; Inception and FID are tested in test_fid.py, here only compare's
mechanics are under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdit.compare.command import run
from maskdit.compare.config import CompareConfig
from maskdit.core.config import ConfigError, build_config, load_config
from maskdit.core.errors import UserError
from maskdit.data.shards import Manifest, write_manifest, write_shard


def digits_dataset(root: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """A pixel-space shard set of uint8 8x8 digits, as `maskdit encode --pixel-space --grayscale` writes."""
    pixels = torch.from_numpy(images).to(torch.uint8)[:, None]  # (N, 1, 8, 8)
    info = write_shard(str(root), 0, {"pixels": pixels, "labels": torch.from_numpy(labels).long()})
    write_manifest(str(root), Manifest(space="pixel", count=len(labels), images=len(labels), channels=1, resolution=8,
                                       shape=(1, 8, 8), dtype="uint8", scale_factor=1.0,
                                       class_names=[str(d) for d in range(10)], shard_size=len(labels), shards=[info]))
    return str(root)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)  # (1797, 8, 8) in 0..16 -> 0..255
    labels = bunch.target
    root = tmp_path_factory.mktemp("digits")
    return digits_dataset(root / "train", images[:1500], labels[:1500]), digits_dataset(root / "heldout", images[1500:],
                                                                                       labels[1500:])


class FeatureStandIn(torch.nn.Module):
    """(N, 3, 299, 299) -> (N, 64): a fixed random 1x1 convolution to 16 channels, pooled to 2 x 2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.proj(x)), 2).flatten(1)  # (N, 64)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("features") / "features.pt"
    torch.jit.script(FeatureStandIn()).save(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    for key in ("MLFLOW_TRACKING_URI", "MASKDIT_PARENT_RUN_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASKDIT_DATA_CACHE", str(tmp_path / "cache"))


def tiny(data: str, reference: str, out: Path, inception: str = "bundled", **overrides) -> dict:
    return {"data": data, "reference": reference, "out": str(out), "inception": inception, "budget_s": 2.0, "eval_points": 2,
            "tune_share": 0.5, "fid_samples": 10, "reference_limit": 20, "batch_size": 10,
            "sampler": {"num_steps": 2}, "device": "cpu",
            "train": {"model": {"preset": "tiny", "in_channels": 1}, "batch": {"global_batch": 16},
                      "log_every": 1}, **overrides}


def test_compare_tiny_gives_both_curves_at_the_same_points(digits, features, tmp_path):
    data, heldout = digits
    result = run(build_config(CompareConfig, tiny(data, heldout, tmp_path / "cmp", features)))
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    masked, plain = saved["arms"]["maskdit"], saved["arms"]["dit"]
    assert [p["target_s"] for p in masked] == [p["target_s"] for p in plain] == [1.0, 2.0]
    for arm in (masked, plain):
        for p in arm:
            assert p["wall_s"] >= p["target_s"] - 1e-3 and p["steps"] >= 1 and p["images"] == 16 * p["steps"]
            assert np.isfinite(p["fid"]) and 0 <= p["accuracy"] <= 1
        # a point the arm's clock already passed (one step longer than the 1 s between points, as on a busy
        # machine) adds no steps: the curve never goes back
        assert arm[1]["steps"] >= arm[0]["steps"] and arm[1]["wall_s"] >= arm[0]["wall_s"]
    assert masked[1]["steps"] > masked[0]["steps"]  # the tuning phase always gets its step
    assert [p["phase"] for p in plain] == ["train", "train"]
    assert masked[-1]["phase"] == "tune"  # the second half of the masked arm is the unmasking tuning
    assert 0 <= saved["classifier_accuracy"] <= 1 and saved["reference_n"] == 20
    assert result.params == saved["params"] > 0
    assert (tmp_path / "cmp" / "maskdit" / "grid-2.png").is_file()
    with pytest.raises(ConfigError, match="already holds a comparison"):
        run(build_config(CompareConfig, tiny(data, heldout, tmp_path / "cmp", features)))


def test_bad_config_names_the_key(digits, tmp_path):
    data, heldout = digits
    with pytest.raises(UserError, match="budget_s"):
        build_config(CompareConfig, tiny(data, heldout, tmp_path / "a", budget_s=-1))
    with pytest.raises(UserError, match="eval_point"):
        load_config(CompareConfig, None, [f"data={data}", f"reference={heldout}", "out=x", "eval_point=3"])
    with pytest.raises(UserError, match="learning_rate"):  # a train override is checked before anything trains
        run(build_config(CompareConfig, tiny(data, heldout, tmp_path / "b", train={"optim": {"learning_rate": 1}})))
    with pytest.raises(UserError, match="mask.schedule"):
        run(build_config(CompareConfig, tiny(data, heldout, tmp_path / "c", tune="mnist_pretrain")))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_inputs_that_cannot_answer_the_question_are_refused_before_training(digits, tmp_path):
    data, heldout = digits
    cases = {"short": ({"budget_s": 1e-4}, "less than one step of the unmasked arm"),
             "same": ({"data": heldout}, "is the training data itself"),
             "few": ({"fid_samples": 30}, "has 20 images .reference_limit=20., fewer than fid_samples=30")}
    for name, (overrides, message) in cases.items():
        cfg = {**tiny(data, heldout, tmp_path / name), **overrides}
        with pytest.raises(UserError, match=message):
            run(build_config(CompareConfig, cfg))
        assert not (tmp_path / name / "maskdit").exists() and not (tmp_path / name / "dit").exists(), name


@pytest.mark.slow
def test_compare_logs_one_parent_run_and_two_child_runs(digits, features, tmp_path, mlflow_server, monkeypatch):
    import mlflow

    data, heldout = digits
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = run(build_config(CompareConfig, tiny(data, heldout, tmp_path / "cmp", features, eval_points=1,
                                                  tracking={"experiment": "compare-test"})))
    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and "maskdit_fid" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"compare.png", "compare.json"}
    experiment = [parent.info.experiment_id]
    children = client.search_runs(experiment, f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["dit", "maskdit"]
    for child in children:  # the training's own metrics and compare's curve, in one run per arm
        assert {"loss", "fid", "accuracy", "images_seen"} <= set(child.data.metrics)
    masked = next(r for r in children if r.info.run_name == "maskdit")
    tune = client.search_runs(experiment, f"tags.mlflow.parentRunId = '{masked.info.run_id}'")
    assert [r.info.run_name for r in tune] == ["maskdit-tune"]

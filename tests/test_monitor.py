"""Watching training in MLflow: sample grids and quick FIDs at their steps, system metrics, the dataset
input and the resolved config, on a real MLflow server; 1 rank and 2 gloo ranks score the same FID.

A tiny pixel-space dataset (3 x 8 x 8 RGB, 4 classes) so that decoding needs no VAE; Inception on
the CPU (0.25 to 1 s an image at 299 x 299) is what costs, so a FID scores 4 samples against 8.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import one_thread  # noqa: F401 (autouse: one thread, no tracking, a private shard cache)

from maskdit.core.config import build_config
from maskdit.core.result import read_result, result_uri
from maskdit.data.shards import Manifest, manifest_sha256, write_manifest, write_shard
from maskdit.train.config import TrainConfig
from maskdit.train.loop import Trainer, TrainResult
from maskdit.train.loop import run as train
from maskdit.train.monitor import FID_METRIC, GRID_KEY, MonitorError

CLI = "from maskdit.cli import app; app()"
ENV1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_pixels(root: Path, n: int = 32) -> str:
    """A pixel-space dataset of n RGB 8 x 8 images, 4 classes, one shard."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    info = write_shard(str(root), 0, {"pixels": pixels, "labels": labels})
    write_manifest(str(root), Manifest(space="pixel", count=n, images=n, channels=3, resolution=8, shape=(3, 8, 8),
                                       dtype="uint8", scale_factor=1.0, class_names=list("abcd"), shard_size=n,
                                       shards=[info]))
    return str(root)


def config(data: str, ckpt: Path, **monitor) -> dict:
    return {"model": {"preset": "tiny", "in_channels": 3, "num_classes": 4}, "data": {"uri": data},
            "checkpoint": {"dir": str(ckpt), "every": 100}, "batch": {"global_batch": 8}, "precision": "fp32",
            "steps": 6, "log_every": 2, "optim": {"lr": 1e-3}, "device": "cpu", "seed": 1,
            "monitor": {"grid_every": 2, "fid_every": 3, "fid_samples": 4, "ref_samples": 8, "grid_columns": 2,
                        "sampler": {"num_steps": 2}, "batch_size": 4, **monitor}}


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> str:
    return make_pixels(tmp_path_factory.mktemp("pixels"))


def test_intervals_default_to_a_few_a_run_and_zero_turns_them_off():
    cfg = build_config(TrainConfig, config("d", Path("c"), grid_every=None, fid_every=None))
    assert cfg.monitor.every(cfg.steps) == (1, 1)  # 6 steps // 4
    assert cfg.monitor.model_copy(update={"grid_every": None}).every(2_000_000) == (500_000, 500_000)
    assert cfg.monitor.model_copy(update={"grid_every": 3, "fid_samples": 0}).every(100) == (3, 0)
    assert cfg.monitor.model_copy(update={"grid_every": 0, "fid_every": None}).every(100) == (0, 0)


def test_untracked_run_samples_nothing_and_costs_nothing(pixels, tmp_path):
    result = train(build_config(TrainConfig, config(pixels, tmp_path / "ck")))
    assert result.grid is None and result.fid_quick is None and result.run_id is None
    assert not (tmp_path / "ck" / "monitor").exists()


def test_grid_classes_outside_the_data_are_refused_before_training(pixels, tmp_path):
    cfg = config(pixels, tmp_path / "ck", grid_classes=[0, 9])
    with pytest.raises(MonitorError, match=r"grid_classes has \[9\], outside 0..3"):
        train(build_config(TrainConfig, cfg))


@pytest.mark.slow
def test_tracked_training_logs_grids_fid_config_dataset_and_system_metrics(pixels, tmp_path, mlflow_server,
                                                                           monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # a sample every 0.5 s, not every 10
    cfg = config(pixels, tmp_path / "ck")
    cfg["tracking"] = {"uri": mlflow_server, "experiment": "monitor", "flush_s": 30}
    built = build_config(TrainConfig, cfg)
    result = train(built)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert result.experiment_id == run.info.experiment_id and result.tracking_uri == mlflow_server

    # grids at steps 2, 4, 6 (grid_every 2), under the key the UI slides over (PNG), and on the store
    images = [f.path for f in client.list_artifacts(result.run_id, "images")]
    pattern = rf"images/{GRID_KEY}\+step\+(\d+)\+.*\.png"  # MLflow's name for an image of a key at a step
    steps = sorted({int(m.group(1)) for p in images if (m := re.fullmatch(pattern, p))})
    assert steps == [2, 4, 6], images
    assert result.grid == str(tmp_path / "ck" / "monitor" / "grid-000000006.png") and Path(result.grid).is_file()
    assert sorted(p.name for p in (tmp_path / "ck" / "monitor").glob("grid-*.png")) == [
        "grid-000000002.png", "grid-000000004.png", "grid-000000006.png"]

    # the quick FID at steps 3 and 6 (fid_every 3), the last one in the result
    history = client.get_metric_history(result.run_id, FID_METRIC)
    assert [m.step for m in history] == [3, 6] and all(m.value > 0 for m in history)
    assert result.fid_quick == pytest.approx(history[-1].value) == pytest.approx(result.metrics["fid_quick"])
    assert (tmp_path / "ck" / "monitor" / "ref_stats.npz").is_file()  # the dataset's own, computed once

    # the resolved config, as YAML
    path = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="config.yaml",
                                               dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)
    assert yaml.safe_load(Path(path).read_text()) == built.model_dump(mode="json")

    # the dataset: source URI, manifest digest, sample count
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    full = manifest_sha256(pixels)
    assert json.loads(dataset.source) == {"uri": pixels} and dataset.digest == full[:32]
    profile = json.loads(dataset.profile)
    assert profile["num_samples"] == 32 and profile["manifest_sha256"] == full and profile["num_classes"] == 4
    assert {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context") == "training"

    # system metrics of the run's node
    system = [key for key in run.data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system


@pytest.mark.slow
def test_two_gloo_ranks_score_the_same_quick_fid_as_one(pixels, tmp_path, mlflow_server):
    """The same 6 images (seed and class by index) on 1 rank and on 2 give the same FID (to 1e-12).

    The EMA is held at the initial weights (decay 1), which are the same in both runs, so what is
    compared is the monitor's sharing of the work, not DDP's float summation order (training 6 steps
    on 2 ranks moves the FID by about 1e-4); every image is its own batch (batch_size 1), because a
    CPU matmul's rounding depends on the batch it is in. The gathered features are then the same bits;
    the float64 statistics may differ in the last bit (numpy's BLAS threads: the torchrun ranks run
    with OMP_NUM_THREADS=1, this process does not). The reference statistics are computed by the
    ranks together as well.
    """
    import mlflow

    runs = {}
    for name in ("one", "two"):
        cfg = config(pixels, tmp_path / name, grid_every=0, fid_every=6, fid_samples=6, batch_size=1)
        cfg["ema"] = {"decay": 1.0}
        cfg["tracking"] = {"uri": mlflow_server, "experiment": "fid-ranks", "system_metrics": False}
        runs[name] = cfg
    first = train(build_config(TrainConfig, runs["one"]))

    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(runs["two"]))
    script = tmp_path / "cli.py"
    script.write_text(CLI + "\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), "train", "--config", str(path)],
                          env={**os.environ, **ENV1}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = read_result(TrainResult, result_uri(str(tmp_path / "two")))
    assert second.world_size == 2 and first.fid_quick is not None
    # the features are the same bits and the reference statistics differ by a few ulps; with the
    # eigenvalues within rounding noise of 0 resolved to 0 (fid._resolved), each of the 5 kept roots
    # moves by ~n * eps * sqrt(lambda_max), so the FID by ~1e-14 relative: 1e-12 leaves a factor 100
    # for conditioning (kept eigenvalues down to 1e-4 lambda_max). Unresolved, the null eigenvalue's
    # root moved it by ~sqrt(n * eps * lambda_max), 3e-11 relative on another machine's BLAS.
    assert second.fid_quick == pytest.approx(first.fid_quick, rel=1e-12, abs=0)
    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(second.run_id, FID_METRIC)] == [6]


def test_fid_from_features_equals_the_full_frechet_distance():
    """The n x n route of the quick FID gives the D x D formula's number (here D = 64, n below and above D)."""
    import numpy as np

    from maskdit.evaluation import fid

    rng = np.random.default_rng(0)
    real = rng.normal(1.0, 2.0, size=(200, 64))
    ref = fid.FIDStats(real.mean(axis=0), np.cov(real, rowvar=False))
    for n in (5, 100, 300):
        fake = rng.normal(size=(n, 64))
        stats = fid.feature_stats(fake)
        full = fid.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        # the D x D route takes square roots of two 64 x 64 eigenproblems: an eigenvalue of size
        # lambda_min perturbed by ~64 * eps * lambda_max moves its root by that / (2 sqrt(lambda_min)),
        # ~1e-10 of the FID for these well-conditioned Gaussians; 1e-7 covers a condition number 1e6
        assert fid.fid_from_features(fake, ref) == pytest.approx(full, rel=1e-7)


def test_monitor_is_idle_between_its_steps(pixels, tmp_path):
    """Steps where nothing is due return at once: no sampling (the EMA network is not called)."""
    from maskdit.core import distributed
    from maskdit.train.monitor import Monitor

    cfg = config(pixels, tmp_path / "ck", grid_every=3, fid_samples=0)
    trainer = Trainer(build_config(TrainConfig, cfg), distributed.setup("cpu"))
    monitor = Monitor(trainer.cfg, trainer.dist, trainer.data, trainer.ema, active=True)
    calls = []
    trainer.ema.register_forward_hook(lambda *args: calls.append(1))
    assert monitor.after_step(1, last=False) == {} and monitor.after_step(2, last=False) == {} and not calls
    assert monitor.grid_images().shape == (4 * 2, 8, 8, 3) and calls  # 4 classes x 2 seeds


def test_latents_without_a_vae_are_not_watched(tmp_path, caplog):
    """Test latents name no VAE: such a run trains as before, without grids or FID, and says so."""
    from test_train import make_data

    from maskdit.core import distributed
    from maskdit.train.monitor import Monitor

    data = make_data(tmp_path / "latents", n=16)
    cfg = build_config(TrainConfig, {"model": "tiny", "data": {"uri": data}, "checkpoint": {"dir": str(tmp_path)},
                                     "batch": {"global_batch": 8}, "device": "cpu", "steps": 8})
    trainer = Trainer(cfg, distributed.setup("cpu"))
    monitor = Monitor(cfg, trainer.dist, trainer.data, trainer.ema, active=True)
    assert (monitor.grid_every, monitor.fid_every, monitor.decode) == (0, 0, None)
    assert "names no VAE" in caplog.text and monitor.after_step(8, last=True) == {}

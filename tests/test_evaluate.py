"""`maskdit evaluate`: FID summary + grid (and MLflow logging) from a tiny model; bad input."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from maskdit import fid
from maskdit.cli import app

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
    # fewer samples than feature dimensions give singular covariances; the FID code handles them
    pytest.mark.filterwarnings("ignore:Matrix is singular"),
]


@pytest.fixture
def ref_stats(tmp_path):
    # a full-rank Gaussian stands in for ADM's reference file (same keys, same shapes)
    rng = np.random.default_rng(0)
    uri = str(tmp_path / "ref.npz")
    fid.save_stats(fid.FIDStats(mu=np.abs(rng.standard_normal(2048)) * 0.3, sigma=np.eye(2048) * 0.05, n=100), uri)
    return uri


def _run(*args):
    result = CliRunner().invoke(app, ["evaluate", *args])
    return result.exit_code, result.output


def test_evaluate_writes_summary_grid_and_logs_to_mlflow(tiny_sampler, ref_stats, tmp_path, mlflow_server,
                                                         monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "eval-test")
    out = tmp_path / "eval"
    code, output = _run(f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", f"out={out}",
                        "num_samples=6", "num_steps=2", "batch_size=4", "grid_columns=3", "grid_classes=[1,7]",
                        "device=cpu")
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(output.strip().splitlines()[-1]) == summary  # last stdout line: the summary
    assert summary["n"] == 6 and summary["cfg_scale"] == 1.5 and summary["steps"] == 2
    assert summary["checkpoint"] == tiny_sampler.checkpoint and summary["step"] == 10
    assert np.isfinite(summary["fid"]) and summary["fid"] > 0 and summary["seconds"] > 0
    assert (out / "grid.png").stat().st_size > 0

    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([mlflow.get_experiment_by_name("eval-test").experiment_id])
    assert run.data.metrics["fid"] == pytest.approx(summary["fid"])
    assert run.data.params["num_samples"] == "6"
    artifacts = {a.path for folder in ("evaluation", "images") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"evaluation/summary.json", "images/grid.png"}


def test_evaluate_bad_input(tiny_sampler, ref_stats, tmp_path):
    base = [f"checkpoint={tiny_sampler.checkpoint}", f"out={tmp_path / 'eval'}", "device=cpu", "num_steps=1"]

    np.savez(tmp_path / "ref64.npz", mu=np.zeros(64), sigma=np.eye(64))
    code, output = _run(*base, f"ref_stats={tmp_path / 'ref64.npz'}")
    assert code == 2 and "mu has shape (64,) and sigma (64, 64), expected (2048,)" in output

    code, output = _run(*base, f"ref_stats={ref_stats}", "model={hidden_size: 1152, depth: 2}")
    assert code == 2 and "hidden_size: config 1152 vs checkpoint 32" in output

    np.savez(tmp_path / "few.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    code, output = _run(*base, f"ref_stats={ref_stats}", f"samples={tmp_path / 'few.npz'}", "num_samples=50")
    assert code == 2 and "holds 5 samples, fewer than num_samples=50" in output

    code, output = _run(*base, f"ref_stats={ref_stats}", "num_smaples=5")
    assert code == 2 and "unknown key 'num_smaples'" in output
    code, output = _run(f"ref_stats={ref_stats}", f"out={tmp_path}")
    assert code == 2 and "checkpoint" in output

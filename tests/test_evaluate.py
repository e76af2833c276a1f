"""`maskdit evaluate`: FID summary + grid (and MLflow logging) from a tiny model; bad input."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.core.result import read_result
from maskdit.evaluation import fid, inception
from maskdit.evaluation.evaluate import EvaluateResult

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


def test_evaluate_writes_result_grid_and_logs_to_mlflow(tiny_sampler, ref_stats, tmp_path, mlflow_server,
                                                         monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "eval-test")
    out = tmp_path / "eval"
    code, output = _run(f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", f"out={out}",
                        "num_samples=6", "sampler.num_steps=2", "batch_size=4", "grid_columns=3",
                        "grid_classes=[1,7]", "device=cpu")
    assert code == 0, output
    result = read_result(EvaluateResult, str(out / "result.json"))
    assert result.num_samples == 6 and result.sampler.cfg_scale == 1.5 and result.sampler.num_steps == 2
    assert result.checkpoint == tiny_sampler.checkpoint and result.step == 10 and result.ref_stats == ref_stats
    assert result.ref_stats_sha256 == hashlib.sha256(Path(ref_stats).read_bytes()).hexdigest()
    assert result.inception_sha256 == inception.BUNDLED_SHA256  # with the ref digest and settings: what register compares
    assert result.dataset == tiny_sampler.dataset and result.grid == str(out / "grid.png")
    assert np.isfinite(result.fid) and result.fid > 0 and result.seconds > 0
    assert f"FID {result.fid:.4g}" in output
    assert (out / "grid.png").stat().st_size > 0
    assert result.accuracy is None and result.classifier is None  # 3-channel 8 px data: no reference classifier

    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([mlflow.get_experiment_by_name("eval-test").experiment_id])
    assert run.data.metrics["fid"] == pytest.approx(result.fid) and "accuracy" not in run.data.metrics
    assert run.data.params["num_samples"] == "6"
    assert result.run_id == run.info.run_id  # register attaches the FID to the model version from this run
    artifacts = {a.path for folder in ("evaluation", "images") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"evaluation/result.json", "images/grid.png"}


def test_evaluate_bad_input(tiny_sampler, ref_stats, tmp_path):
    base = [f"checkpoint={tiny_sampler.checkpoint}", f"out={tmp_path / 'eval'}", "device=cpu", "sampler.num_steps=1"]

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


def test_evaluate_checks_every_input_before_the_first_sample(tiny_sampler, ref_stats, tmp_path, monkeypatch):
    """Issue 16.11: a bad grid class or an unwritable out fails in seconds, before any image is sampled."""
    from maskdit.evaluation import sample

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the inputs")

    monkeypatch.setattr(sample, "generate_batches", no_sampling)
    base = [f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", "device=cpu", "num_samples=4"]
    code, output = _run(*base, f"out={tmp_path / 'eval'}", "grid_classes=[1,12]")
    assert code == 2 and "class 12 is outside 0..9" in output
    (tmp_path / "a-file").write_text("")
    code, output = _run(*base, f"out={tmp_path / 'a-file' / 'eval'}")
    assert code == 2 and "cannot write the evaluation folder (out)" in output and "a-file" in output


@pytest.mark.slow  # trains the reference MNIST classifier (about 25 CPU-seconds) into a fresh cache
def test_evaluate_scores_digits_with_the_reference_classifier(ref_stats, tmp_path, monkeypatch):
    import torch

    from maskdit.data.decode import load_decoder
    from maskdit.data.shards import read_manifest
    from maskdit.evaluation.classifier import mnist_classifier
    from maskdit.evaluation.sample import generate, random_labels
    from maskdit.method.diffusion import EDMPrecond, SamplerConfig
    from maskdit.method.model import MaskDiT, model_config
    from tests.fixtures.tiny_sampler import _pixel_manifest

    monkeypatch.setenv("MASKDIT_CLASSIFIER_CACHE", str(tmp_path / "classifiers"))
    torch.manual_seed(0)
    config = model_config("tiny", input_size=32, in_channels=1, patch_size=8)  # MNIST's shape, 16 tokens
    net = MaskDiT(config)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape) * 0.2)
    dataset = _pixel_manifest(tmp_path / "digits", config)  # pixel space, 1 channel, classes 0-9: MNIST-like
    checkpoint = tmp_path / "ckpt-000000010.pt"
    torch.save({"format_version": 1, "model_config": config.model_dump(), "model": net.state_dict(),
                "ema": net.state_dict(), "optimizer": None, "scaler": None, "step": 10,
                "train_config": {"data": {"uri": dataset}}}, checkpoint)
    out = tmp_path / "eval"
    code, output = _run(f"checkpoint={checkpoint}", f"ref_stats={ref_stats}", f"out={out}", "num_samples=12",
                        "sampler.num_steps=2", "batch_size=5", "grid_columns=2", "device=cpu")
    assert code == 0, output
    result = read_result(EvaluateResult, str(out / "result.json"))
    classifier = mnist_classifier()  # the cached one evaluate trained
    assert result.classifier == classifier.name and result.classifier_accuracy >= 0.95
    # the same samples (labels from the seed, image i from seed + i), judged here: the same share
    labels = random_labels(12, 10, 0)
    images = generate(EDMPrecond(net).eval(), load_decoder(read_manifest(dataset), "cpu"), labels, list(range(12)),
                      SamplerConfig(num_steps=2), batch_size=5)  # batches as evaluate made them
    # both are k / 12 (one image off is 0.083); abs 1e-6 only absorbs a float32 mean's rounding (~1e-8)
    assert result.accuracy == pytest.approx(float((classifier.predict(images) == labels.numpy()).mean()), abs=1e-6)
    assert f"class accuracy {result.accuracy:.1%}" in output


def test_the_grid_shows_every_class_of_a_ten_class_data_set(tiny_sampler, ref_stats, tmp_path):
    from PIL import Image

    from maskdit.evaluation.evaluate import default_grid_classes

    assert default_grid_classes(10) == list(range(10)) and default_grid_classes(1000) == list(range(10))
    assert default_grid_classes(3) == [0, 1, 2]
    out = tmp_path / "eval"
    code, output = _run(f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", f"out={out}",
                        "num_samples=2", "sampler.num_steps=2", "grid_columns=3", "device=cpu")
    assert code == 0, output
    width, height = Image.open(out / "grid.png").size
    side = 64 + 2  # 8 px samples enlarged to 64 px, 2 px padding
    assert (height, width) == (10 * side + 2, 3 * side + 2)  # one row a class (0-9), one column a seed


def _torchrun_evaluate(nproc: int, out: Path, *args: str, max_restarts: int = 0) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--no-python", str(bin_dir / "maskdit"), "evaluate", f"out={out}",
           "device=cpu", *args]
    # one thread per process in every run: the same kernels, so the same bits, whatever the process count
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_one_two_and_three_ranks_give_the_same_features_and_fid(tiny_sampler, ref_stats, tmp_path):
    """Batches are fixed by image index, so the features are the same bits for any rank count; with 3 ranks
    and 2 batches (6 samples, batch 4) the third rank has no image at all and the job still finishes."""
    args = [f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", "num_samples=6", "batch_size=4",
            "sampler.num_steps=2", "grid_classes=[1]", "grid_columns=2"]
    runs = {n: _torchrun_evaluate(n, tmp_path / f"ranks{n}", *args) for n in (1, 2, 3)}
    results = {}
    for n, proc in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        results[n] = read_result(EvaluateResult, str(tmp_path / f"ranks{n}" / "result.json"))
    assert [r.world_size for r in results.values()] == [1, 2, 3]
    assert len({r.features_sha256 for r in results.values()}) == 1 and results[1].features_sha256
    assert results[1].fid == results[2].fid == results[3].fid  # the same features, the same float64 arithmetic


def _workers(proc: subprocess.Popen) -> dict[str, "psutil.Process"]:
    """torchrun's live workers by RANK (from their environment)."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if rank is not None and "evaluate" in " ".join(child.cmdline()):
                found[rank] = child
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_a_rank_killed_mid_evaluation_restarts_the_job_and_no_partial_fid_is_written(tiny_sampler, ref_stats,
                                                                                      tmp_path):
    """SIGKILL to rank 1 while the ranks sample: torchrun (as a PyTorchJob would) restarts both ranks, which
    evaluate again from the first image; result.json appears once, whole, with the FID of an undisturbed run."""
    import time

    args = [f"checkpoint={tiny_sampler.checkpoint}", f"ref_stats={ref_stats}", "num_samples=8", "batch_size=2",
            "sampler.num_steps=3", "grid_classes=[1]", "grid_columns=2"]
    killed_out = tmp_path / "killed"
    # the restarts a job has by default (ClusterSettings.backoff_limit): the restarted group's gloo setup can
    # itself be refused under load (seen once in four full runs); the kill is the test, a second restart is not
    proc = _torchrun_evaluate(2, killed_out, *args, max_restarts=3)
    deadline = time.monotonic() + 300
    while "1" not in (workers := _workers(proc)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the ranks load the model and Inception, then sample: kill one of them on the way
    assert not (killed_out / "result.json").exists()
    workers["1"].kill()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "closing signal" in output  # torchrun stopped the surviving rank: the group ran again, whole
    assert output.count("FID ") == 1  # printed by rank 0 once, after the restart
    clean = _torchrun_evaluate(1, tmp_path / "clean", *args)
    clean_output, _ = clean.communicate(timeout=600)
    assert clean.returncode == 0, clean_output[-3000:]
    after_kill = read_result(EvaluateResult, str(killed_out / "result.json"))
    undisturbed = read_result(EvaluateResult, str(tmp_path / "clean" / "result.json"))
    assert after_kill.num_samples == 8 and after_kill.world_size == 2
    assert after_kill.features_sha256 == undisturbed.features_sha256 and after_kill.fid == undisturbed.fid

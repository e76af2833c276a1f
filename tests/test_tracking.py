"""MLflow tracking against a real `mlflow server`: params, metrics, nesting, resume; off without a URI."""

from __future__ import annotations

import math
import os
import time

import mlflow
import pytest
import torch
from test_train import make_data, tiny_config

from maskdit.core import tracking
from maskdit.core.config import build_config
from maskdit.core.tracking_server import TrackingError
from maskdit.method import checkpoint
from maskdit.train.config import TrainConfig
from maskdit.train.loop import run as train

METRICS = {"loss", "dsm", "mae", "lr", "mask_ratio", "grad_norm", "img_per_s", "skipped_steps"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ("MLFLOW_TRACKING_URI", "MASKDIT_PARENT_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what mlflow itself sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASKDIT_DATA_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    while mlflow.active_run():
        mlflow.end_run()


def test_no_uri_means_no_tracking():
    with tracking.tracking_run("x", {"a": 1}) as run_id:
        assert run_id is None and tracking.active_run_id() is None
        tracking.log_metrics({"loss": 1.0}, step=1)  # a no-op, not an error


def test_disabled_rank_does_not_track():
    with tracking.tracking_run("x", {"a": 1}, uri="http://127.0.0.1:9", enabled=False) as run_id:
        assert run_id is None


@pytest.mark.slow
def test_params_metrics_nesting_and_resume(mlflow_server, monkeypatch):
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with tracking.tracking_run("parent", None, experiment="nest") as parent_id:
        pass
    monkeypatch.setenv("MASKDIT_PARENT_RUN_ID", parent_id)
    params = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "steps": 5}
    with tracking.tracking_run("child", params, tags={"maskdit.step": "train"}, experiment="elsewhere") as child_id:
        tracking.log_metrics({"loss": 0.5}, step=3)
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.tags["maskdit.step"] == "train"
    assert child.info.experiment_id == client.get_run(parent_id).info.experiment_id
    assert child.data.params == {"optim.lr": "0.0001", "optim.betas": "[0.9, 0.999]", "steps": "5"}
    assert child.info.status == "FINISHED"
    monkeypatch.setenv("MLFLOW_RUN_ID", child_id)  # a pipeline step resuming its run
    with tracking.tracking_run("again", {**params, "steps": 6}) as again_id:
        tracking.log_metrics({"loss": 0.25}, step=4)
    assert again_id == child_id
    assert [m.value for m in client.get_metric_history(child_id, "loss")] == [0.5, 0.25]
    assert client.get_run(child_id).data.params["steps"] == "5"  # MLflow params cannot change
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # (mlflow consumes it)
    with tracking.tracking_run("fresh", None, run_id="f" * 32) as fresh_id:  # a checkpoint from another server
        pass
    assert fresh_id not in (None, "f" * 32, child_id)


@pytest.mark.slow
def test_training_logs_to_mlflow_and_resumes_its_run(mlflow_server, tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "ck", steps=4, log_every=2,
                      tracking={"uri": mlflow_server, "experiment": "train", "run_name": "tiny"})
    first = train(build_config(TrainConfig, cfg))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(first.run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.hidden_size"] == "32"
    assert run.data.params["mask.schedule"] == "constant" and run.data.params["batch.global_batch"] == "16"
    assert METRICS <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [2, 4]
    assert all(math.isfinite(v) for v in run.data.metrics.values())

    # preempted and started again with more steps: the same MLflow run continues
    second = train(build_config(TrainConfig, {**cfg, "steps": 6}))
    assert second.run_id == first.run_id
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [2, 4, 6]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_one_line_and_quick():
    """Issue 16.10: an unreachable MLflow retried for minutes, then raised a long traceback."""
    import time

    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        with tracking.tracking_run("x", {"a": 1}, uri=f"http://u:pw-123@127.0.0.1:{_free_port()}"):
            pass
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert "is unreachable" in message and "MLFLOW_TRACKING_URI" in message and "\n" not in message
    assert "pw-123" not in message


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_are_never_logged_printed_or_stored(mlflow_server, tmp_path, capfd, caplog,
                                                                           monkeypatch):
    """Issue 16.5: tracking.uri=http://user:password@host was an MLflow param, printed, and in the checkpoint."""
    import logging

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what connect() sets
        monkeypatch.delenv(key)
    secret = "pa55-w0rd"
    uri = mlflow_server.replace("http://", f"http://alice:{secret}@")
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "ck", steps=2, log_every=1, tracking={"uri": uri, "experiment": "secret"})
    with caplog.at_level(logging.DEBUG):
        result = train(build_config(TrainConfig, cfg))
    run = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(result.run_id)
    assert run.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://***@")
    assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
    stored = checkpoint.load_checkpoint(result.checkpoint)["train_config"]  # a file or a sharded folder
    assert stored["tracking"]["uri"] == mlflow_server.replace("http://", "http://***@")
    out, err = capfd.readouterr()
    assert secret not in out + err + caplog.text
    assert secret not in os.environ.get("MLFLOW_TRACKING_URI", "")


@pytest.mark.slow
def test_mlflow_outage_during_training_is_buffered_and_replayed(mlflow_server_process, tmp_path, caplog,
                                                                monkeypatch):
    """Issue 16.7: with the server down, metric logging retried ~4 minutes, then training died with a traceback.

    The session's server is killed after the first logged step and restarted (same port, same
    store) two logs later: training goes on, exits 0, and every metric reaches the server.
    """
    import logging

    from typer.testing import CliRunner

    from maskdit.cli import app

    server = mlflow_server_process
    data = make_data(tmp_path / "data")
    logged_steps = []
    real_log_metrics = tracking.log_metrics

    def log_metrics(metrics, step=None):
        real_log_metrics(metrics, step)
        logged_steps.append(step)
        if step == 1:
            server.stop()
        elif step == 3:
            time.sleep(1.5)  # the metric thread fails at least once while the server is down
            server.start()

    monkeypatch.setattr(tracking, "log_metrics", log_metrics)
    args = ["train", "-c", "mnist_pretrain", f"data.uri={data}", "model=tiny", f"checkpoint.dir={tmp_path / 'ck'}",
            "steps=6", "log_every=1", "batch.global_batch=16", "device=cpu", f"tracking.uri={server.uri}",
            "tracking.experiment=outage", "tracking.retry_s=0.5", "tracking.flush_s=30"]
    try:
        with caplog.at_level(logging.WARNING, logger="maskdit.core.metric_logger"):
            result = CliRunner().invoke(app, args)
    finally:
        if not server.running:  # the other tests of the session need it
            server.start()
    assert result.exit_code == 0, result.output
    assert logged_steps == [1, 2, 3, 4, 5, 6]
    assert f"MLflow at {server.uri} is unreachable" in caplog.text and "training goes on" in caplog.text
    assert "during the run; all 48 metric values were logged" in caplog.text
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run = client.search_runs([client.get_experiment_by_name("outage").experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert run.info.status == "FINISHED"

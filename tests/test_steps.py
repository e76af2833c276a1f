"""The pipeline steps as the components run them: results travel as result.json, never as log lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from test_train import make_data, tiny_config

from components.steps import TrainStep, train_step
from maskdit.core.result import ResultError, read_result, result_uri
from maskdit.train.loop import TrainResult

# What a library, another rank's teardown or a deprecation notice may print after the result:
# a process-wide exit hook that writes lines (one of them JSON) once `maskdit train` has finished.
NOISE = '''
import atexit, sys
def _noise():
    print('{"checkpoint": "s3://not/the/result.pt"}')
    print("UserWarning: a library says goodbye after the result", file=sys.stderr)
    print("s3://also/not/the/result.pt")
atexit.register(_noise)
'''


@pytest.mark.slow
def test_a_training_step_that_prints_after_its_result(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOISE)
    monkeypatch.setenv("PYTHONPATH", f"{site}:{Path(__file__).resolve().parents[1]}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_data(tmp_path / "data", n=32)
    config = tmp_path / "tiny.yaml"
    cfg = tiny_config(data, "set-by-the-step", steps=3, **{"checkpoint.every": 3})
    config.write_text(yaml.safe_dump(cfg))
    cluster = dict(image="unused", backend="local", nodes=1, gpus_per_node=0, cpu_request="1", cpu_limit="1",
                   memory_request="1Gi", memory_limit="1Gi", shm_size="1Gi", backoff_limit=0, pending_timeout_hours=0.1)
    step = TrainStep(stage="pretrain", config=str(config), dataset=data, store_uri=str(tmp_path / "store"),
                     kfp_run_id="run-1", experiment="x", cluster=cluster, timeout_hours=0.1)
    result, parent, logs = train_step(step)
    assert result.checkpoint == f"{step.checkpoint_dir}/ckpt-000000003" and result.step == 3
    assert (Path(result.checkpoint) / "COMMIT.json").is_file() and parent == ""
    assert logs == {"local": f"{step.checkpoint_dir}/logs/local.log"} and "says goodbye" in Path(logs["local"]).read_text()
    assert read_result(TrainResult, result_uri(step.checkpoint_dir)) == result


def test_results_name_their_step_and_their_problems(tmp_path):
    uri = str(tmp_path / "result.json")
    with pytest.raises(ResultError, match=f"no step result at {uri}: the train step did not finish"):
        read_result(TrainResult, uri)
    (tmp_path / "result.json").write_text(json.dumps({"kind": "encode", "dataset": "x"}))
    with pytest.raises(ResultError, match="is not a train result"):
        read_result(TrainResult, uri)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ResultError, match=str(tmp_path)):
        read_result(TrainResult, uri)
    written = TrainResult(checkpoint="c.pt", checkpoint_dir=str(tmp_path), step=3).write(uri)
    assert read_result(TrainResult, written).step == 3 and written == result_uri(str(tmp_path))
    assert result_uri("s3://b/ref.npz", is_file=True) == "s3://b/ref.npz.result.json"
    assert sys.modules["maskdit.core.result"].RESULT_FILE == "result.json"


@pytest.mark.slow
def test_steps_close_the_runs_that_killed_processes_left_running(tracking):
    """Issue 11.6: the evaluate step closes stale training runs, the exit step every stale run; the parent says why."""
    from components.steps import close_stale_runs, parent_run

    parent = parent_run("kfp-7", "weekly", "steps-stale-runs")
    experiment_id = tracking.get_run(parent).info.experiment_id
    train = tracking.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "maskdit.step": "train"})
    other = tracking.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "maskdit.step": "evaluate"})
    assert close_stale_runs("kfp-7", "steps-stale-runs", "training finished", step="train") == [train.info.run_id]
    assert tracking.get_run(train.info.run_id).info.status == "KILLED"
    assert tracking.get_run(other.info.run_id).info.status == "RUNNING"
    assert close_stale_runs("kfp-7", "steps-stale-runs", "the pipeline run ended") == [other.info.run_id]
    tags = tracking.get_run(parent).data.tags
    assert tags[f"maskdit.closed_run.{train.info.run_id}"] == "KILLED: training finished"
    assert close_stale_runs("kfp-7", "steps-stale-runs", "again") == []


def test_the_exit_step_waits_for_a_down_mlflow_once_not_once_a_closing(monkeypatch):
    """With MLflow down, closing the stale runs and then the parent run each probed it and each waited the whole
    retry budget (300 s in production) before the step exited 143. Now one wait: with the budget 0 each wait is
    one probe, so the probes count the waits."""
    from components.steps import close_pipeline_run
    from maskdit.core import tracking_server
    from maskdit.core.tracking_server import TrackingUnavailable

    probes = []

    def down(uri):
        probes.append(uri)
        raise TrackingUnavailable(f"MLflow at {uri} is unreachable (connection refused)")

    monkeypatch.setattr(tracking_server, "_probe", down)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MASKDIT_RETRY_BUDGET_S", "0")
    for close_stale in (True, False):
        probes.clear()
        with pytest.raises(TrackingUnavailable, match="unreachable"):
            close_pipeline_run("kfp-8", "exit-step", "FAILED", "boom", close_stale=close_stale)
        assert probes == ["http://127.0.0.1:9"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    probes.clear()
    close_pipeline_run("kfp-8", "exit-step", "SUCCEEDED")  # not tracking: nothing to close, nothing probed
    assert probes == []


@pytest.mark.slow
def test_the_exit_step_closes_stale_children_and_the_parent(tracking):
    """The exit step's MLflow part against a real server: a child left RUNNING is KILLED, the parent FAILED with
    KFP's state and error; without `close_stale` (its jobs could not be deleted) the children are left alone."""
    from components.steps import close_pipeline_run, parent_run

    parent = parent_run("kfp-9", "nightly", "exit-step")
    experiment_id = tracking.get_run(parent).info.experiment_id
    child = tracking.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "maskdit.step": "train"})
    close_pipeline_run("kfp-9", "exit-step", "FAILED", "the tune step failed", close_stale=False)
    assert tracking.get_run(child.info.run_id).info.status == "RUNNING"
    run = tracking.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["kfp.error"] == "the tune step failed"
    close_pipeline_run("kfp-9", "exit-step", "FAILED", "the tune step failed")
    assert tracking.get_run(child.info.run_id).info.status == "KILLED"
    assert "the pipeline run ended (FAILED)" in tracking.get_run(child.info.run_id).data.tags["maskdit.closed_reason"]


def test_training_shows_metrics_and_a_card_with_the_run_link_and_the_last_grid(tmp_path):
    """What pretrain and tune publish to the KFP UI comes from their result.json alone."""
    import base64
    import re

    import numpy as np
    from kfp.dsl import Markdown, Metrics

    from components.steps import show_training
    from maskdit.evaluation.sample import png_bytes

    png = png_bytes(np.full((4, 6, 3), 200, dtype="uint8"))
    (tmp_path / "grid.png").write_bytes(png)
    result = TrainResult(checkpoint="s3://b/runs/r/tune/ckpt-000000009.pt", checkpoint_dir="s3://b/runs/r/tune",
                         step=9, metrics={"loss": 0.25, "img_per_s": 120.5, "dsm": 0.2, "mae": 0.5},
                         skipped_steps=1, run_id="abc123", tracking_uri="http://mlflow:5000", experiment_id="7",
                         grid=str(tmp_path / "grid.png"), fid_quick=42.5, seconds=61.0)
    metrics, card = Metrics(name="metrics", uri=str(tmp_path / "metrics")), Markdown(name="card",
                                                                                       uri=str(tmp_path / "card"))
    show_training(result, metrics, card, "Unmasking tuning")
    assert metrics.metadata == {"steps": 9.0, "skipped_steps": 1.0, "wall_time_s": 61.0, "loss": 0.25, "dsm": 0.2,
                                "mae": 0.5, "img_per_s": 120.5, "fid_quick": 42.5}
    text = (tmp_path / "card").read_text()
    assert text.startswith("## Unmasking tuning") and "| quick FID | 42.500 |" in text
    assert "[abc123](http://mlflow:5000/#/experiments/7/runs/abc123)" in text
    assert base64.b64decode(re.search(r"\(data:image/png;base64,([^)]+)\)", text).group(1)) == png

    untracked = result.model_copy(update={"run_id": None, "tracking_uri": None, "experiment_id": None, "grid": None})
    show_training(untracked, Metrics(name="m", uri=str(tmp_path / "m")), card)
    text = (tmp_path / "card").read_text()
    assert "| MLflow run | not tracked |" in text and "base64" not in text


def test_a_result_whose_grid_lies_outside_the_run_is_refused(tmp_path, bucket):
    """A result.json's grid is embedded in the KFP card: it must be one of the run's own files."""
    from maskdit.core import storage

    run = tmp_path / "runs" / "r" / "tune"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the card")
    (run / "monitor").mkdir(parents=True)
    (run / "monitor" / "grid-000000009.png").write_bytes(b"png")
    base = TrainResult(checkpoint=str(run / "ckpt-000000009.pt"), checkpoint_dir=str(run), step=9, metrics={},
                       skipped_steps=0, seconds=1.0)
    for grid in (str(secret), str(run / ".." / ".." / ".." / "secret.txt"), "/etc/hostname", f"s3://{bucket}/x.png",
                 str(run)):
        base.model_copy(update={"grid": grid}).write(result_uri(str(run)))
        with pytest.raises(ResultError, match=r"grid .* lies outside the run's folder"):
            read_result(TrainResult, result_uri(str(run)), within=str(run))
    own = str(run / "monitor" / "grid-000000009.png")
    base.model_copy(update={"grid": own}).write(result_uri(str(run)))
    assert read_result(TrainResult, result_uri(str(run)), within=str(run)).grid == own
    # the same rule on S3: '..' in a key does not lead out of the run
    prefix = f"s3://{bucket}/runs/r/tune"
    assert storage.inside(f"{prefix}/monitor/g.png", prefix)
    assert not storage.inside(f"{prefix}/../../other/g.png", prefix) and not storage.inside(f"{prefix}x/g.png", prefix)
    assert not storage.inside(str(own), prefix)


def test_a_training_step_refuses_options_and_its_own_keys_before_launching(tmp_path):
    """The overrides come after `--` on the job's command line; an option or a key the step sets is refused."""
    from components.parameters import ParameterError

    for bad, said in (("--config=other.yaml", "is an option"), ("--help", "is an option"),
                      ("data.uri=s3://other", "set by the pretrain step itself"),
                      ("checkpoint.dir=/elsewhere", "set by the pretrain step itself")):
        step = TrainStep(stage="pretrain", config="mnist_pretrain", overrides=["steps=3", bad], dataset="d",
                         store_uri=str(tmp_path), kfp_run_id="r", experiment="e", timeout_hours=1.0,
                         cluster={"backend": "local"})
        with pytest.raises(ParameterError, match=said):
            train_step(step)
    assert not (tmp_path / "runs").exists()

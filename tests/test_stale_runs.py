"""MLflow child runs left RUNNING by a SIGKILLed step are closed, and the pipeline's parent run says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import pytest

from maskdit.core.parent_run import close_stale_runs
from maskdit.core.tracking import tracking_run

STEP = textwrap.dedent("""
    import sys, time
    from maskdit.core import tracking
    with tracking.tracking_run("attempt", tags={"maskdit.step": sys.argv[1]}) as run_id:
        print(run_id, flush=True)
        time.sleep(300)
""")


def _killed_step(step: str, env: dict[str, str]) -> str:
    """Run id of a step process that opened its MLflow run and was then SIGKILLed."""
    proc = subprocess.Popen([sys.executable, "-c", STEP, step], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert run_id and proc.returncode == -signal.SIGKILL, err[-2000:]
    return run_id


@pytest.mark.slow
def test_close_stale_runs_marks_sigkilled_children_and_tags_the_parent(tracking):
    client = tracking  # the fixture: MLFLOW_TRACKING_URI set for this process and its children
    experiment = client.create_experiment("stale-runs")
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    other_parent = client.create_run(experiment, run_name="another pipeline").info.run_id
    train_run = _killed_step("train", {**os.environ, "MASKDIT_PARENT_RUN_ID": parent})
    # runs left open the same way (a created run is RUNNING), by another step and by another pipeline
    eval_run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "maskdit.step": "evaluate"})
    elsewhere = client.create_run(experiment, tags={"mlflow.parentRunId": other_parent, "maskdit.step": "train"})
    eval_run, elsewhere = eval_run.info.run_id, elsewhere.info.run_id
    with mlflow.start_run(experiment_id=experiment, tags={"mlflow.parentRunId": parent}) as done:
        pass  # a step that ended normally
    assert {client.get_run(r).info.status for r in (train_run, eval_run, elsewhere)} == {"RUNNING"}

    reason = "step train retried after its pod was OOMKilled"
    assert close_stale_runs(parent, reason, step="train") == [train_run]
    killed = client.get_run(train_run)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert killed.data.tags["maskdit.closed_reason"] == reason
    assert client.get_run(parent).data.tags[f"maskdit.closed_run.{train_run}"] == f"KILLED: {reason}"
    assert client.get_run(eval_run).info.status == "RUNNING"  # another step's run: not this retry's

    assert close_stale_runs(parent, "pipeline cleanup", status="FAILED") == [eval_run]
    assert client.get_run(eval_run).info.status == "FAILED"
    assert client.get_run(parent).data.tags[f"maskdit.closed_run.{eval_run}"] == "FAILED: pipeline cleanup"
    assert client.get_run(done.info.run_id).info.status == "FINISHED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another pipeline's run
    assert close_stale_runs(parent, "again") == []

    # a training resumed from its checkpoint continues its run, closed or still RUNNING
    for run_id in (train_run, elsewhere):
        with tracking_run("resumed", run_id=run_id) as resumed:
            assert resumed == run_id and client.get_run(run_id).info.status == "RUNNING"
        assert client.get_run(run_id).info.status == "FINISHED"


def test_close_stale_runs_without_tracking_or_with_a_bad_status(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert close_stale_runs("0" * 32, "cleanup") == []
    with pytest.raises(ValueError, match="'FINISHED': use 'KILLED' or 'FAILED'"):
        close_stale_runs("0" * 32, "cleanup", status="FINISHED")

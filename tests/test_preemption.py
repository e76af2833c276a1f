"""SIGTERM at an arbitrary moment: all ranks stop after the same step, its checkpoint is written, the exit
code is 143, and resuming ends bitwise where an uninterrupted run ends; a write in flight is never cut
into a committed name; a config error exits 2 through `maskdit.elastic` under torchrun.

The signal lands a random delay after training starts (the delay is in every assertion message).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import CLI, ENV1, data, one_thread, states_equal, tiny_config  # noqa: F401 (fixtures)

from maskdit.core.config import build_config
from maskdit.core.errors import EXIT_RETRYABLE, EXIT_USER_ERROR, UserError
from maskdit.core.result import read_result, result_uri
from maskdit.method import checkpoint, sharded
from maskdit.train.config import TrainConfig
from maskdit.train.loop import TrainResult
from maskdit.train.loop import run as train
from maskdit.train.state import CheckpointWriteError

MASKDIT = str(Path(sys.executable).with_name("maskdit"))  # the console script, as the PyTorchJob runs it
STOPPED = re.compile(r"stopped on SIGTERM after step (\d+) of")


def _config(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _elastic(ranks: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "maskdit.elastic", "--standalone", "--nproc-per-node", str(ranks), "--no-python",
            MASKDIT, "train", "--config", str(config)]


def _sigterm_after_start(command: list[str], delay: float, timeout: float = 180) -> tuple[int, str]:
    """Run `command`, send SIGTERM `delay` s after its first "training steps" log line; (exit code, stderr)."""
    proc = subprocess.Popen(command, env={**os.environ, **ENV1}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:  # ends when the process closes stderr (it exited before training)
        lines.append(line)
        if "training steps" in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "training did not start in time:\n" + "".join(lines)[-3000:]
    _, rest = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + rest


def _stopped_step(err: str, context: str) -> int:
    steps = {int(s) for s in STOPPED.findall(err)}
    assert len(steps) == 1, f"{context}: expected one agreed stop step, found {steps}:\n{err[-3000:]}"
    return steps.pop()


# ------------------------------------------------------------------------------ one process


@pytest.mark.slow
def test_sigterm_one_process_checkpoints_exits_143_and_resumes_bitwise(data, tmp_path, mlflow_server):
    import mlflow

    steps, delay = 100, random.uniform(0.0, 1.5)
    context = f"SIGTERM {delay:.3f} s after training started"
    straight = train(build_config(TrainConfig, tiny_config(data, tmp_path / "straight", steps=steps)))

    ck = tmp_path / "stopped"
    cfg = tiny_config(data, ck, steps=steps, tracking={"uri": mlflow_server, "experiment": "preempt"},
                      **{"checkpoint.every": 1000})  # only the stop writes a checkpoint before the end
    config = _config(tmp_path, "stopped", cfg)
    code, err = _sigterm_after_start([sys.executable, "-c", CLI, "train", "--config", str(config)], delay)
    assert code == EXIT_RETRYABLE, f"{context}: exit code {code}\n{err[-3000:]}"
    stopped_at = _stopped_step(err, context)
    assert 0 < stopped_at < steps, context
    assert [s for s, _ in checkpoint.list_checkpoints(str(ck))] == [stopped_at], context
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_uri(str(ck), stopped_at))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(state["tracking_run_id"]).info.status == "KILLED", context

    resumed = subprocess.run([sys.executable, "-c", CLI, "train", "--config", str(config)],
                             env={**os.environ, **ENV1}, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr, context
    final = checkpoint.load_checkpoint(read_result(TrainResult, result_uri(str(ck))).checkpoint)
    states_equal(checkpoint.load_checkpoint(straight.checkpoint), final)
    run = client.get_run(state["tracking_run_id"])  # the resumed training continued the same MLflow run
    assert final["tracking_run_id"] == run.info.run_id and run.info.status == "FINISHED"


# ------------------------------------------------------------------------------ writes


@pytest.mark.parametrize("fmt", ["sharded", "file"])
def test_a_checkpoint_write_failing_mid_run_is_retryable(data, tmp_path, monkeypatch, fmt):
    """The store was fine at the start (the resume check read it) and fails later: worth a restart, not a
    UserError (exit 143, not 2). Sharded: the background upload's error reaches the loop at its next wait."""
    ck = tmp_path / "ck"
    module, name = (sharded, "write_shard") if fmt == "sharded" else (checkpoint, "save_checkpoint")
    real = getattr(module, name)

    def store_gone_at_step_4(dir_uri, state, *args):
        if state["step"] == 4:
            shutil.rmtree(ck)
            ck.write_text("the checkpoint folder is now a file")
        return real(dir_uri, state, *args)

    monkeypatch.setattr(module, name, store_gone_at_step_4)
    with pytest.raises(CheckpointWriteError, match="writing the checkpoint of step 4 failed: cannot write") as error:
        train(build_config(TrainConfig, tiny_config(data, ck, steps=8, **{"checkpoint.every": 2,
                                                                          "checkpoint.format": fmt})))
    assert not isinstance(error.value, UserError)


WIDE = {"preset": "tiny", "hidden_size": 512, "num_heads": 4}  # ~25 MB a state copy: a write takes a while


def _partial_writes(ck: Path) -> list[int]:
    """Steps whose checkpoint is being written (a non-empty hidden .partial shard in ckpt-<step>/)."""
    found = []
    for path in ck.glob("ckpt-*/.shard-*.partial") if ck.is_dir() else []:
        try:
            if path.stat().st_size > 0:
                found.append(int(path.parent.name.split("-")[1]))
        except (FileNotFoundError, ValueError):  # renamed into place meanwhile
            pass
    return sorted(set(found))


@pytest.mark.slow
@pytest.mark.parametrize("grace", [60.0, 0.01])
def test_sigterm_during_a_checkpoint_write_never_commits_half_a_file(data, tmp_path, grace):
    """Long grace: the background upload in flight completes, one more step runs and its checkpoint is written
    too. Grace shorter than the upload: the process exits 143 at once, the upload stays a hidden partial file
    in a folder without a commit marker (not a checkpoint)."""
    ck = tmp_path / "ck"
    cfg = tiny_config(data, ck, steps=400, model=WIDE, **{"checkpoint.every": 3, "checkpoint.grace_period_s": grace})
    proc = subprocess.Popen([sys.executable, "-c", CLI, "train", "--config", str(_config(tmp_path, "wide", cfg))],
                            env={**os.environ, **ENV1}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writing: list[int] = []
    deadline = time.monotonic() + 180
    while not writing and proc.poll() is None and time.monotonic() < deadline:
        writing = [s for s in _partial_writes(ck) if s >= 6]  # with an older checkpoint committed
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err_bytes = proc.communicate(timeout=120)
    err = err_bytes.decode()
    assert writing, f"the signal did not land during a write:\n{err[-3000:]}"
    assert proc.returncode == EXIT_RETRYABLE, err[-3000:]
    in_flight = writing[0]
    committed = checkpoint.list_checkpoints(str(ck))
    for step, uri in committed:  # every committed name holds a whole checkpoint
        assert checkpoint.load_checkpoint(uri)["step"] == step
    steps = [s for s, _ in committed]
    if grace > 1:
        assert _stopped_step(err, "long grace") == in_flight + 1
        assert steps[-2:] == [in_flight, in_flight + 1]
    else:
        assert "did not stop within checkpoint.grace_period_s=0.01" in err, err[-3000:]
        assert in_flight not in steps and steps and all(s < in_flight for s in steps)
        assert _partial_writes(ck) == [in_flight]  # abandoned where no reader looks


# ------------------------------------------------------------------------------ two ranks under torchrun


@pytest.mark.slow
def test_sigterm_two_ranks_under_elastic_stop_together_and_resume_bitwise(data, tmp_path):
    steps, delay = 100, random.uniform(0.0, 1.5)
    context = f"SIGTERM to maskdit.elastic {delay:.3f} s after training started"
    env = {**os.environ, **ENV1}
    straight = subprocess.run(_elastic(2, _config(tmp_path, "straight", tiny_config(data, tmp_path / "straight",
                                                                                    steps=steps))),
                              env=env, capture_output=True, text=True, timeout=240)
    assert straight.returncode == 0, straight.stderr[-3000:]

    ck = tmp_path / "stopped"
    config = _config(tmp_path, "stopped", tiny_config(data, ck, steps=steps, **{"checkpoint.every": 1000}))
    code, err = _sigterm_after_start(_elastic(2, config), delay, timeout=240)
    assert code == EXIT_RETRYABLE, f"{context}: exit code {code}\n{err[-3000:]}"
    stopped_at = _stopped_step(err, context)  # both ranks report it: one step agreed
    assert len(STOPPED.findall(err)) == 2 and 0 < stopped_at < steps, f"{context}\n{err[-3000:]}"
    assert [s for s, _ in checkpoint.list_checkpoints(str(ck))] == [stopped_at], context

    resumed = subprocess.run(_elastic(2, config), env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr, context
    states_equal(checkpoint.load_checkpoint(read_result(TrainResult, result_uri(str(tmp_path / "straight"))).checkpoint),
                 checkpoint.load_checkpoint(read_result(TrainResult, result_uri(str(ck))).checkpoint))


@pytest.mark.slow
def test_unknown_key_exits_2_through_elastic_with_the_message(data, tmp_path):
    config = _config(tmp_path, "bad", tiny_config(data, tmp_path / "ck"))
    run = subprocess.run(_elastic(2, config) + ["optim.learning_rate=1"], env={**os.environ, **ENV1},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_USER_ERROR, run.stderr[-3000:]
    assert "unknown key 'optim.learning_rate'" in run.stderr
    assert "exiting with 2" in run.stderr

"""Warm starts and resumes across runs (maskdit/train/warmstart.py): init_from a registered model, resume_from
another run's folder. The tiny model and data of tests/test_train.py, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import build, make_data, one_thread, states_equal, tiny_config  # noqa: F401 (one_thread: autouse)

from maskdit.core import distributed
from maskdit.core.errors import UserError
from maskdit.core.result import read_result, result_uri
from maskdit.method import checkpoint
from maskdit.train.loop import Trainer, TrainResult
from maskdit.train.loop import run as train
from maskdit.train.warmstart import PIN_FILE, InitError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(tmp_path_factory.mktemp("latents"))


# ------------------------------------------------------------------------------ resume_from


def test_resume_from_another_folder_continues_exactly(data, tmp_path):
    """A failed run stopped at step 4; a new run with its own folder continues it to step 8, bitwise equal to
    a run that never stopped, and writes its checkpoints into its own folder only."""
    straight = train(build(tiny_config(data, tmp_path / "straight", steps=8)))
    failed = train(build(tiny_config(data, tmp_path / "failed", steps=4)))
    before = sorted(p.name for p in (tmp_path / "failed").iterdir())

    new = tmp_path / "new"
    result = train(build(tiny_config(data, new, steps=8, **{"checkpoint.resume_from": str(tmp_path / "failed")})))
    assert result.step == 8 and result.resumed_from == failed.checkpoint
    assert Path(result.checkpoint).parent == new and [s for s, _ in checkpoint.list_checkpoints(str(new))] == [8]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == before  # the failed run's folder is untouched
    final = checkpoint.load_checkpoint(result.checkpoint)
    states_equal(checkpoint.load_checkpoint(straight.checkpoint), final)
    assert final["resumed_from"] == failed.checkpoint

    # a restarted pod resumes from its own, newer checkpoint, not from resume_from again; lineage stays
    again = train(build(tiny_config(data, new, steps=12, **{"checkpoint.resume_from": str(tmp_path / "failed")})))
    assert again.step == 12 and again.resumed_from == failed.checkpoint
    assert read_result(TrainResult, result_uri(str(new))).step == 12


def test_resume_from_a_folder_without_checkpoints_is_refused(data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="resume_from .*empty holds no checkpoint"):
        train(build(tiny_config(data, tmp_path / "new", **{"checkpoint.resume_from": str(tmp_path / "empty")})))
    assert not (tmp_path / "new").exists() or not checkpoint.list_checkpoints(str(tmp_path / "new"))


def test_init_from_and_resume_from_together_are_refused(data, tmp_path):
    with pytest.raises(InitError, match="keep one"):
        build(tiny_config(data, tmp_path, init_from=str(tmp_path), **{"checkpoint.resume_from": str(tmp_path)}))
    with pytest.raises(InitError, match="models:/<name>@<alias>"):
        build(tiny_config(data, tmp_path, init_from="models:/a/b/c"))


# ------------------------------------------------------------------------------ init_from models:/


@pytest.mark.slow
def test_init_from_a_registered_model(data, tmp_path, tracking):
    """models:/<name>@champion on a real MLflow server: the registered version's weights (its EMA, as model and
    EMA), resolved once and pinned, recorded as lineage in the result, the checkpoint and the MLflow run."""
    from maskdit.registry.register import register

    name = "warmstart-tiny"
    pre = train(build(tiny_config(data, tmp_path / "pre", steps=4)))
    registered = register(pre.checkpoint, 50.0, name, dataset_uri=data)
    assert registered.champion and registered.version == "1"
    ema = checkpoint.load_checkpoint(pre.checkpoint)["ema"]

    cfg = build(tiny_config(data, tmp_path / "tune", steps=2, init_from=f"models:/{name}@champion"))
    trainer = Trainer(cfg, distributed.setup("cpu"))
    for key, value in ema.items():  # the registered EMA, as bf16 rounds it (maskdit.method.weights.WEIGHTS_DTYPE)
        assert torch.equal(trainer.precond.net.state_dict()[key], value.to(torch.bfloat16).float())
        assert torch.equal(trainer.ema.net.state_dict()[key], value.to(torch.bfloat16).float())
    assert trainer.step == 0 and not trainer.optimizer.state

    # the champion moves before the job restarts (no checkpoint yet): the pinned version 1 still loads
    other = train(build(tiny_config(data, tmp_path / "other", steps=2, seed=9)))
    tracking.set_registered_model_alias(name, "champion", register(other.checkpoint, 40.0, name,
                                                                   dataset_uri=data).version)
    assert (tmp_path / "tune" / PIN_FILE).is_file()
    result = train(cfg)
    source = result.init_from
    assert (source.uri, source.resolved, source.version) == (f"models:/{name}@champion", f"models:/{name}/1", "1")
    assert source.run_id == registered.run_id and source.step == 4
    assert checkpoint.load_checkpoint(result.checkpoint)["init_from"]["resolved"] == f"models:/{name}/1"
    tags = tracking.get_run(result.run_id).data.tags
    assert tags["init_from.resolved"] == f"models:/{name}/1" and tags["init_from.run_id"] == registered.run_id
    assert tracking.get_run(result.run_id).data.params["init_from"] == f"models:/{name}@champion"

    # a new run resolves the alias anew: version 2 now
    fresh = Trainer(build(tiny_config(data, tmp_path / "fresh", steps=2, init_from=f"models:/{name}@champion")),
                    distributed.setup("cpu"))
    assert fresh.init_source.resolved == f"models:/{name}/2"

    # two ranks: rank 0 resolves and pins, rank 1 loads the version it was sent (from the registry itself)
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "ddp.yaml"
    ddp_cfg = tiny_config(data, tmp_path / "ddp", steps=1, init_from=f"models:/{name}@champion")
    config.write_text(yaml.safe_dump(ddp_cfg))
    script = tmp_path / "cli.py"
    script.write_text("from maskdit.cli import app; app()\n")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "train", "--config", str(config)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    written = read_result(TrainResult, result_uri(str(tmp_path / "ddp")))
    assert written.world_size == 2 and written.init_from.resolved == f"models:/{name}/2"

    # another network: refused, naming both configs and what to do
    wide = tiny_config(data, tmp_path / "wide", init_from=f"models:/{name}/1", model={"preset": "tiny",
                                                                                       "hidden_size": 64})
    with pytest.raises(checkpoint.ModelMismatchError) as error:
        Trainer(build(wide), distributed.setup("cpu"))
    message = str(error.value)
    assert f"models:/{name}/1" in message and "'hidden_size': 64" in message and "'hidden_size': 32" in message
    assert "hidden_size" in message.split("(fields")[1] and "set the config's model" in message

    with pytest.raises(InitError, match="no-such-model"):
        Trainer(build(tiny_config(data, tmp_path / "none", init_from="models:/no-such-model@champion")),
                distributed.setup("cpu"))


# ------------------------------------------------------------------------------ the pipeline's steps


@pytest.mark.slow
def test_the_pretrain_step_resumes_a_failed_runs_folder(data, tmp_path, monkeypatch):
    """pretrain_resume_from: the step passes checkpoint.resume_from to `maskdit train` (torchrun, local backend);
    the new run continues the failed run's step count in its own folder."""
    import yaml

    from components.steps import TrainStep, run_dir, train_step

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = str(tmp_path / "store")
    failed = train(build(tiny_config(data, f"{run_dir(store, 'run-1')}/pretrain", steps=2)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, "set-by-the-step", steps=4)))
    cluster = dict(image="unused", backend="local", nodes=1, gpus_per_node=0, cpu_request="1", cpu_limit="1",
                   memory_request="1Gi", memory_limit="1Gi", shm_size="1Gi", backoff_limit=0, pending_timeout_hours=0.1)
    step = TrainStep(stage="pretrain", config=str(config), dataset=data, store_uri=store, kfp_run_id="run-2",
                     experiment="x", cluster=cluster, timeout_hours=0.1,
                     resume_from=f"{run_dir(store, 'run-1')}/pretrain")
    result, _, _ = train_step(step)
    assert result.step == 4 and result.resumed_from == failed.checkpoint
    assert result.checkpoint == checkpoint.checkpoint_uri(f"{run_dir(store, 'run-2')}/pretrain", 4)


def test_tune_init_from_skips_pretraining(tmp_path):
    from kfp.dsl import Markdown, Metrics, Model

    from components.steps import StepError, skip_pretraining

    model, metrics = Model(name="model", uri=str(tmp_path / "model")), Metrics(name="m", uri=str(tmp_path / "m"))
    card = Markdown(name="card", uri=str(tmp_path / "card"))
    card.path = str(tmp_path / "card.md")  # the executor sets it in a step
    skip_pretraining("models:/m@champion", {"pretrain_init_from": "", "pretrain_resume_from": ""}, model, metrics,
                     card)
    assert model.metadata["uri"] == "models:/m@champion" and metrics.metadata == {"steps": 0.0}
    assert "`models:/m@champion`" in (tmp_path / "card.md").read_text()
    with pytest.raises(StepError, match="pretrain_resume_from='s3://b/runs/x/pretrain' would be ignored"):
        skip_pretraining("models:/m@champion", {"pretrain_resume_from": "s3://b/runs/x/pretrain"}, model, metrics,
                         card)


def test_init_from_weights_that_do_not_fit_the_model_is_one_line(data, tmp_path):
    """Issue 29.1: a checkpoint whose config matches the model but whose tensors do not (an edited file)
    ended in torch's size-mismatch RuntimeError: exit 143 and a traceback, restarted until the backoff limit.
    Now a ModelMismatchError (exit 2) naming the source and the tensor."""
    source = train(build(tiny_config(data, tmp_path / "source", steps=2)))
    state = checkpoint.load_checkpoint(source.checkpoint)
    name = next(iter(state["ema"]))
    for key in ("model", "ema"):
        state[key][name] = torch.zeros(3, 5)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(UserError) as info:  # the weight checks (maskdit/method/weights.py) name it first
        train(build(tiny_config(data, tmp_path / "new", init_from=str(tmp_path / "edited.pt"))))
    message = str(info.value)
    assert "\n" not in message and "edited.pt" in message and name in message and "do not fit" in message
    assert info.value.exit_code == 2


def test_training_with_mlflow_down_past_the_budget_exits_143_in_one_line(data, tmp_path, monkeypatch):
    """Issue 29.1: MLflow unreachable as training starts (its pod being rescheduled) exited 2: the pipeline run
    failed for good. Now it is retried within MASKDIT_RETRY_BUDGET_S (3 s in the tests), then exit 143."""
    import socket

    import yaml
    from typer.testing import CliRunner

    from maskdit.cli import app

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "ck", steps=2,
                                                 tracking={"uri": f"http://127.0.0.1:{port}"})))
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 143, result.output
    errors = [line for line in result.output.splitlines() if "retrying in" not in line]
    assert len(errors) == 1 and f"MLflow at http://127.0.0.1:{port} is unreachable" in errors[0]
    assert "Traceback" not in result.output

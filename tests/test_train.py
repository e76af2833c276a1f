"""The training loop: checkpoints, exact resume after SIGKILL, 1 rank == 2 ranks, guards, schedules.

Everything runs on the CPU with the "tiny" model (8x8x4 latents, ~60k parameters) and one
intra-op thread, so results are deterministic and bitwise comparable across processes.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from maskdit.core.config import ConfigError, build_config, load_config
from maskdit.core.result import read_result, result_uri
from maskdit.data.shards import Manifest, ShardError, write_manifest, write_shard
from maskdit.method import checkpoint
from maskdit.train.config import MaskConfig, TrainConfig
from maskdit.train.loop import NonFiniteError, Trainer, TrainResult
from maskdit.train.loop import run as train
from maskdit.train.step import BatchPlan

CLI = "from maskdit.cli import app; app()"
ENV1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_data(root: Path, n: int = 64, nan: bool = False) -> str:
    """A latent dataset of n samples (4, 8, 8), 10 classes, in two shards."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 4, 8, 8, generator=gen)
    if nan:
        mean[:] = float("nan")
    logvar = torch.randn(n, 4, 8, 8, generator=gen) - 4
    labels = torch.randint(0, 10, (n,), generator=gen)
    half = n // 2
    infos = [write_shard(str(root), i, {"mean": mean[s].half(), "logvar": logvar[s].half(), "labels": labels[s]})
             for i, s in enumerate([slice(0, half), slice(half, n)])]
    write_manifest(str(root), Manifest(
        space="latent", count=n, images=n, channels=4, resolution=64, shape=(4, 8, 8), dtype="float16",
        scale_factor=0.5, class_names=[str(i) for i in range(10)], shard_size=half, shards=infos))
    return str(root)


def tiny_config(data: str, ckpt_dir: Path | str, **overrides) -> dict:
    cfg = {
        "model": "tiny", "data": {"uri": data}, "checkpoint": {"dir": str(ckpt_dir), "every": 4, "keep_last": 10},
        "batch": {"global_batch": 16, "micro_batch": 8}, "precision": "fp32", "steps": 8, "log_every": 2,
        "optim": {"lr": 1e-3}, "device": "cpu", "seed": 3,
        "monitor": {"grid_every": 0, "fid_samples": 0},  # the latents have no VAE to decode; test_monitor.py
    }
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def build(cfg: dict) -> TrainConfig:
    return build_config(TrainConfig, cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(tmp_path_factory.mktemp("latents"))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """One intra-op thread (deterministic, no oversubscription); no tracking; a private shard cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for key in ("MLFLOW_TRACKING_URI", "MASKDIT_PARENT_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what mlflow itself sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASKDIT_DATA_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(threads)


def states_equal(a: dict, b: dict) -> None:
    """Bitwise equality of model, EMA and optimizer state of two checkpoints."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for name, value in opt_a[index].items():
            assert torch.equal(value, opt_b[index][name]), f"optimizer state {index}.{name} differs"


# ------------------------------------------------------------------------------ config


def test_config_rejects_unknown_keys_and_bad_batches(data, tmp_path):
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        build(tiny_config(data, tmp_path, **{"optim.learning_rate": 1}))
    with pytest.raises(ConfigError, match="preset 'XXL/2'"):
        build(tiny_config(data, tmp_path, model="XXL/2"))
    cfg = build(tiny_config(data, tmp_path, model={"preset": "tiny", "depth": 3}))
    assert cfg.model.depth == 3 and cfg.model.hidden_size == 32
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        cfg.batch.split(3)
    with pytest.raises(ConfigError, match="micro_batch 8 must divide the per-rank batch 4"):
        cfg.batch.split(4)
    assert cfg.batch.split(2) == (8, 8, 1) and cfg.batch.split(1) == (16, 8, 2)


PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "maskdit" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_shipped_presets_load(preset):
    from maskdit.train.config import preset_path

    cfg = load_config(TrainConfig, preset_path(preset))
    assert cfg.steps > 0 and cfg.checkpoint.dir
    if preset.startswith("imagenet256"):
        assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.patch_size) == (28, 1152, 2)
        assert cfg.optim.lr == (1e-4 if "pretrain" in preset else 5e-5)
    if "tune" in preset:
        assert cfg.init_from and cfg.precision in ("tf32", "fp32")


def test_cosine_schedule_values():
    mask = MaskConfig(ratio=0.5, schedule="cosine")
    ratios = [mask.ratio_at(i, 11) for i in range(11)]
    assert ratios[0] == 0.5 and ratios[-1] == 0.0
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    assert math.isclose(ratios[5], 0.5 * math.cos(math.pi / 4) ** 4)
    assert MaskConfig(schedule="zero").ratio_at(0, 10) == 0.0


def test_lr_schedule_values():
    from maskdit.train.config import OptimConfig

    constant = OptimConfig(lr=1e-3, warmup_steps=4)
    assert [constant.lr_at(i, 20) for i in (0, 1, 3, 4, 19)] == [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3]
    cosine = OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine")
    lrs = [cosine.lr_at(i, 14) for i in range(14)]
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]  # the warm-up is the same
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(lrs[4 + 9 // 2 - 1], 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert OptimConfig(lr=1e-3, schedule="cosine").lr_at(0, 10) == 1e-3
    assert OptimConfig().schedule == "constant"


def test_batch_plan_shuffles_each_epoch_and_splits_ranks():
    plan = BatchPlan(64, 16, seed=0)
    epoch0 = torch.cat([plan.global_indices(s) for s in range(4)])
    epoch1 = torch.cat([plan.global_indices(s) for s in range(4, 8)])
    assert sorted(epoch0.tolist()) == list(range(64)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1) and not torch.equal(epoch0, torch.arange(64))
    assert plan.position(5)["epoch"] == 1 and plan.position(5)["batch_in_epoch"] == 1


# ------------------------------------------------------------------------------ training


def test_train_writes_checkpoints_and_keeps_last(data, tmp_path):
    result = train(build(tiny_config(data, tmp_path / "ck", steps=6, **{"checkpoint.every": 2,
                                                                        "checkpoint.keep_last": 2})))
    assert result.step == 6 and result.skipped_steps == 0
    assert result.checkpoint == checkpoint.checkpoint_uri(str(tmp_path / "ck"), 6)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path / "ck"))] == [4, 6]
    for key in ("loss", "dsm", "mae", "lr", "mask_ratio", "grad_norm", "img_per_s", "skipped_steps"):
        assert math.isfinite(result.metrics[key]), key
    state = checkpoint.load_checkpoint(result.checkpoint)
    assert state["data_position"] == {"epoch": 1, "batch_in_epoch": 2, "samples_seen": 96, "dataset_size": 64,
                                      "global_batch": 16}
    moved = [k for k in state["model"] if not torch.equal(state["model"][k], state["ema"][k])]
    assert moved, "EMA should lag the model"
    # started again when done: nothing to do, same final checkpoint
    again = train(build(tiny_config(data, tmp_path / "ck", steps=6)))
    assert again.checkpoint == result.checkpoint and again.step == 6


@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_ema_rampup_caps_the_half_life_at_a_share_of_the_steps_taken(ratio):
    """EDM's rule: the EMA's half-life (in steps) is min(its own, ratio x steps taken); decay = 0.5 ** (1/h)."""
    from maskdit.train.config import EmaConfig

    ema = EmaConfig(decay=0.9999, rampup_ratio=ratio)
    half_life = math.log(0.5) / math.log(ema.decay)  # 6931.1 steps
    for t in (1, 2, 10, 1000, 100_000, 10**7):
        h = math.log(0.5) / math.log(ema.decay_at(t))
        # two logs and a power of doubles: a few ulp each, far below 1e-9 relative
        assert h == pytest.approx(min(half_life, ratio * t), rel=1e-9), t
    assert EmaConfig(decay=0.9999).decay_at(1) == 0.9999  # no ramp-up: the constant decay from the first step


def test_a_ramped_up_ema_follows_the_weights_at_the_start(data, tmp_path):
    """With a tiny ramp-up ratio the first update's decay is 0.5 ** 1e6 = 0: the EMA becomes the weights
    exactly (lerp with weight 1 returns its end point), where a constant 0.9999 keeps the initial weights."""
    result = train(build(tiny_config(data, tmp_path / "ck", steps=1, **{"ema.rampup_ratio": 1e-6})))
    state = checkpoint.load_checkpoint(result.checkpoint)
    assert all(torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])


def test_no_grad_clip_skips_the_scaling_pass_and_trains_bitwise_the_same(data, tmp_path):
    """grad_clip unset computes the norm only; a clip far above it scales every gradient by exactly 1.0."""
    plain = train(build(tiny_config(data, tmp_path / "a", steps=3)))
    clipped = train(build(tiny_config(data, tmp_path / "b", steps=3, **{"optim.grad_clip": 1e30})))
    a, b = (checkpoint.load_checkpoint(r.checkpoint) for r in (plain, clipped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert plain.metrics["grad_norm"] == clipped.metrics["grad_norm"]


def test_max_wall_s_stops_with_a_checkpoint_and_resumes_exactly(data, tmp_path):
    """A wall-clock stop ends the call after the step that passes max_wall_s, with that step's checkpoint;
    calling again continues from it, bitwise as a run without the stop (what `maskdit compare` builds on)."""
    cfg = tiny_config(data, tmp_path / "ck", steps=10**6, max_wall_s=0.3, **{"checkpoint.every": 10**6})
    first = train(build(cfg))
    assert 1 <= first.step < 10**6 and first.seconds >= 0.3
    assert first.checkpoint == checkpoint.checkpoint_uri(str(tmp_path / "ck"), first.step)
    assert math.isfinite(first.metrics["loss"])
    second = train(build(cfg))
    assert second.step > first.step
    straight = train(build(tiny_config(data, tmp_path / "straight", steps=second.step)))
    states_equal(checkpoint.load_checkpoint(second.checkpoint), checkpoint.load_checkpoint(straight.checkpoint))


def test_all_checkpoints_unreadable_refuses_a_fresh_start(data, tmp_path):
    """Issue 16.6: with every checkpoint unreadable, training warned and restarted at step 0 (exit 0)."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "ckpt-000000008.pt").write_bytes(b"not a checkpoint")
    (ck / "ckpt-000000012.pt").write_bytes(b"\x80\x02half a pickle")
    with pytest.raises(checkpoint.CheckpointError) as error:
        train(build(tiny_config(data, ck, steps=4)))
    message = str(error.value)
    assert "none loads" in message and "ckpt-000000008.pt (" in message and "ckpt-000000012.pt (" in message
    assert "move them away" in message and "\n" not in message
    assert sorted(p.name for p in ck.iterdir()) == ["ckpt-000000008.pt", "ckpt-000000012.pt"]  # nothing written


def test_pruning_keeps_checkpoints_newer_than_the_resumed_one(data, tmp_path):
    """Issue 16.6: pruning by step number deleted the checkpoints just written when an unreadable newer one
    was there, and the final line named a file that did not exist."""
    ck = tmp_path / "ck"
    train(build(tiny_config(data, ck, steps=2, **{"checkpoint.every": 2})))
    (ck / "ckpt-000000099.pt").write_bytes(b"damaged")
    result = train(build(tiny_config(data, ck, steps=6, **{"checkpoint.every": 2, "checkpoint.keep_last": 1})))
    assert result.step == 6 and Path(result.checkpoint).is_dir()
    assert sorted(p.name for p in ck.glob("ckpt-*")) == ["ckpt-000000006", "ckpt-000000099.pt"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(data, tmp_path, precision):
    result = train(build(tiny_config(data, tmp_path, steps=2, precision=precision)))
    assert result.skipped_steps == 0 and math.isfinite(result.metrics["loss"])
    state = checkpoint.load_checkpoint(result.checkpoint)
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_resume_refuses_another_model(data, tmp_path):
    train(build(tiny_config(data, tmp_path, steps=4)))
    with pytest.raises(checkpoint.ModelMismatchError) as error:
        train(build(tiny_config(data, tmp_path, steps=8, model={"preset": "tiny", "hidden_size": 64})))
    assert "'hidden_size': 64" in str(error.value) and "'hidden_size': 32" in str(error.value)


def test_cosine_tuning_from_pretraining(data, tmp_path):
    """init_from: the pretraining's model and EMA, a fresh optimizer, its own steps; mask ratio ends at 0."""
    pre = train(build(tiny_config(data, tmp_path / "pre", steps=4)))
    tune_cfg = build(tiny_config(data, tmp_path / "tune", steps=5, log_every=1, init_from=str(tmp_path / "pre"),
                                 mask={"ratio": 0.5, "schedule": "cosine"}, **{"optim.lr": 5e-4}))
    from maskdit.core import distributed

    trainer = Trainer(tune_cfg, distributed.setup("cpu"))
    pre_state = checkpoint.load_checkpoint(pre.checkpoint)
    for name, value in trainer.precond.net.state_dict().items():
        assert torch.equal(value, pre_state["model"][name])
        assert torch.equal(trainer.ema.net.state_dict()[name], pre_state["ema"][name])
    assert trainer.step == 0 and not trainer.optimizer.state
    seen = []
    trainer.train_step = _record(trainer.train_step, seen)
    result = trainer.run()
    assert result.step == 5 and result.metrics["mask_ratio"] == 0.0
    assert seen[0] == 0.5 and seen[-1] == 0.0 and all(math.isfinite(x) for x in seen)
    assert math.isfinite(result.metrics["loss"]) and result.skipped_steps == 0


def _record(step_fn, seen):
    def wrapped(step, executor):
        out = step_fn(step, executor)
        assert out["finite"]
        seen.append(out["mask_ratio"])
        return out

    return wrapped


# ------------------------------------------------------------------------------ guards


def test_nonfinite_loss_is_skipped_and_counted(data, tmp_path, monkeypatch):
    import maskdit.train.step as train_module

    real, calls = train_module.maskdit_loss, []

    def flaky(*args, **kwargs):  # micro batches 4 and 5 = step 2 (two micro batches a step)
        out = real(*args, **kwargs)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) in (5, 6) else out

    monkeypatch.setattr(train_module, "maskdit_loss", flaky)
    result = train(build(tiny_config(data, tmp_path, steps=6)))
    assert result.skipped_steps == 1 and result.step == 6
    state = checkpoint.load_checkpoint(result.checkpoint)
    assert state["skipped_steps"] == 1 and not checkpoint.nonfinite_tensors(state["model"])


def test_nonfinite_data_stops_after_k_steps(tmp_path):
    data = make_data(tmp_path / "nan", nan=True)
    with pytest.raises(ShardError, match="row 0 of 'mean' holds NaN"):  # caught at load, with the checksum
        train(build(tiny_config(data, tmp_path / "ck", steps=20)))
    # without that check (data.verify off) the loss is non-finite: training stops after k such steps
    cfg = build(tiny_config(data, tmp_path / "ck", steps=20, max_nonfinite_steps=3))
    cfg.data.verify = False
    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 3 steps in a row") as error:
        train(cfg)
    assert "lower optim.lr" in str(error.value) and "grad_clip" in str(error.value)
    assert checkpoint.list_checkpoints(str(tmp_path / "ck")) == []  # nothing non-finite was written


# ------------------------------------------------------------------------------ resume and ranks


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(data, tmp_path):
    # killed soon after its first checkpoint: the 100 steps after it leave a wide window for the kill
    steps = 120
    straight = train(build(tiny_config(data, tmp_path / "straight", steps=steps, **{"checkpoint.every": 20})))

    ck = tmp_path / "killed"
    config = _write_config(tmp_path / "train.yaml", tiny_config(data, ck, steps=steps, **{"checkpoint.every": 20}))
    env = {**os.environ, **ENV1}
    proc = subprocess.Popen([sys.executable, "-c", CLI, "train", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = ck / "ckpt-000000020" / "COMMIT.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
    saved = [s for s, _ in checkpoint.list_checkpoints(str(ck))]
    assert saved and saved[-1] < steps, saved
    killed_at = saved[-1]

    resumed = subprocess.run([sys.executable, "-c", CLI, "train", "--config", str(config)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and f"at step {killed_at}" in resumed.stderr
    final_uri = read_result(TrainResult, result_uri(str(ck))).checkpoint  # the result, not a log line
    assert final_uri == checkpoint.checkpoint_uri(str(ck), steps)
    states_equal(checkpoint.load_checkpoint(straight.checkpoint), checkpoint.load_checkpoint(final_uri))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(data, tmp_path, mlflow_server):
    """torchrun --nproc-per-node 2 with global batch 16 == one process with batch 16 (2 micro batches).

    Rank 0 alone talks to MLflow: the experiment ends up with exactly one run.
    """
    import mlflow

    one = train(build(tiny_config(data, tmp_path / "one", steps=3, **{"optim.lr": 1e-4})))
    script = tmp_path / "cli.py"
    script.write_text(CLI + "\n")
    cfg = tiny_config(data, tmp_path / "two", steps=3, tracking={"uri": mlflow_server, "experiment": "ddp"},
                      **{"optim.lr": 1e-4})
    config = _write_config(tmp_path / "ddp.yaml", cfg)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         "train", "--config", str(config)],
        env={**os.environ, **ENV1}, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    written = read_result(TrainResult, result_uri(str(tmp_path / "two")))
    assert written.world_size == 2 and written.step == one.step
    final_uri = written.checkpoint
    a, b = checkpoint.load_checkpoint(one.checkpoint), checkpoint.load_checkpoint(final_uri)
    for key in ("model", "ema"):
        for name in a[key]:
            # DDP sums gradients in another order (~1e-7 relative a step); Adam's m / sqrt(v) passes that on to the
            # update, so after a few steps ~1e-6 relative: rtol 1e-4 leaves 100x for small, cancelling gradients
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-6, msg=f"{key}.{name}")

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["batch.global_batch"] == "16"


def test_a_checkpoint_slower_than_the_grace_period_warns_naming_both(data, tmp_path, caplog):
    """Issue 23.7: a pod whose checkpoint takes longer than its grace period loses up to checkpoint.every steps
    on every preemption; training says so, with the measured time and the setting. A write cannot take less
    than a nanosecond, nor a million seconds here."""
    import logging
    import re

    with caplog.at_level(logging.WARNING, logger="maskdit.train"):
        train(build(tiny_config(data, tmp_path / "fast", steps=2, **{"checkpoint.grace_period_s": 1e6})))
        assert "grace_period_s" not in caplog.text
        train(build(tiny_config(data, tmp_path / "slow", steps=2, **{"checkpoint.grace_period_s": 1e-9})))
    found = re.search(r"checkpoint took ([\d.]+) s, longer than checkpoint.grace_period_s=1e-09 s", caplog.text)
    assert found, caplog.text
    assert "checkpoint.every=" in caplog.text and "raise the pipeline's grace_period_s" in caplog.text

"""Checkpoint format: atomic writes, newest-valid-wins, weights_only loads, guards, the EMA export."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from maskdit.core import storage
from maskdit.method import checkpoint
from maskdit.method.diffusion import EDMPrecond
from maskdit.method.model import MaskDiT, model_config


def tiny_state(step: int, **changes) -> dict:
    """A training checkpoint of the "tiny" model, shaped as the trainer writes it."""
    torch.manual_seed(step)
    cfg = model_config("tiny")
    net = MaskDiT(cfg)
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.data.mul_(0.5)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {
        "model_config": cfg.model_dump(), "model": net.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "scaler": None, "step": step,
        "rng": {"torch": torch.get_rng_state(), "cuda": []},
        "data_position": {"epoch": 0, "batch_in_epoch": step, "samples_seen": 16 * step, "dataset_size": 64,
                          "global_batch": 16},
        "skipped_steps": 0, "tracking_run_id": None, "train_config": {"steps": 10, "optim": {"betas": [0.9, 0.999]}},
    }
    state.update(changes)
    return state


def test_roundtrip_loads_with_weights_only(tmp_path):
    uri = checkpoint.save_checkpoint(str(tmp_path), tiny_state(3))
    assert uri == str(tmp_path / "ckpt-000000003.pt")
    state = checkpoint.load_checkpoint(uri)
    assert state["format_version"] == checkpoint.FILE_FORMAT_VERSION and state["step"] == 3
    assert torch.equal(state["rng"]["torch"], tiny_state(3)["rng"]["torch"])
    original = tiny_state(3)
    for name, value in original["model"].items():
        assert torch.equal(state["model"][name], value)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    # weights_only: the file is readable without trusting pickled code
    torch.load(uri, weights_only=True)


def test_keep_last_and_listing_ignores_other_files(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(str(tmp_path), tiny_state(step), keep_last=2)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".ckpt-000000009.pt.abc.partial").write_bytes(b"half")  # an interrupted write
    (tmp_path / "old").mkdir()
    checkpoint.save_checkpoint(str(tmp_path / "old"), tiny_state(7))  # a nested folder is not ours
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-000000004.pt")
    assert checkpoint.latest_checkpoint(str(tmp_path / "missing")) is None


def test_corrupt_newest_is_skipped_and_reported(tmp_path, caplog):
    good = checkpoint.save_checkpoint(str(tmp_path), tiny_state(5))
    data = Path(good).read_bytes()
    (tmp_path / "ckpt-000000006.pt").write_bytes(data[: len(data) // 2])  # truncated
    torch.save([1, 2, 3], tmp_path / "ckpt-000000007.pt")  # not a maskdit checkpoint
    with caplog.at_level(logging.WARNING, logger="maskdit.method.checkpoint"):
        uri, state = checkpoint.load_latest(str(tmp_path))
    assert uri == good and state["step"] == 5
    assert "ckpt-000000006.pt is corrupt" in caplog.text and "ckpt-000000007.pt lacks" in caplog.text


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({**tiny_state(1), "extra": Path("/etc")}, path)  # an arbitrary object: needs full unpickling
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or not a torch checkpoint"):
        checkpoint.load_checkpoint(str(path))


def test_nonfinite_weights_are_never_saved(tmp_path):
    state = tiny_state(2)
    next(iter(state["ema"].values())).view(-1)[0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to save step 2: ema tensors"):
        checkpoint.save_checkpoint(str(tmp_path), state)
    assert list(tmp_path.iterdir()) == []


def test_model_mismatch_names_both_shapes():
    state = tiny_state(1)
    with pytest.raises(checkpoint.ModelMismatchError) as error:
        checkpoint.check_model_config(model_config("tiny", depth=3), state, "ckpt-x.pt")
    message = str(error.value)
    assert "fields ['depth']" in message and "'depth': 3" in message and "'depth': 2" in message


def test_load_ema_model_from_file_or_folder(tmp_path):
    state = tiny_state(4)
    checkpoint.save_checkpoint(str(tmp_path), tiny_state(2))
    uri = checkpoint.save_checkpoint(str(tmp_path), state)
    for source in (uri, str(tmp_path)):
        precond, cfg, meta = checkpoint.load_ema_model(source, "cpu")
        assert isinstance(precond, EDMPrecond) and not precond.training
        assert cfg == model_config("tiny") and meta["step"] == 4 and meta["uri"] == uri
        for name, value in precond.net.state_dict().items():
            assert torch.equal(value, state["ema"][name])
    with pytest.raises(checkpoint.CheckpointError, match="no valid checkpoint"):
        checkpoint.load_ema_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_checkpoints_on_s3(bucket):
    prefix = f"s3://{bucket}/runs/a"
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(prefix, tiny_state(step), keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(prefix)] == [2, 3]
    storage.put_bytes(f"{prefix}/ckpt-000000004.pt", b"garbage")
    uri, state = checkpoint.load_latest(prefix)
    assert uri == f"{prefix}/ckpt-000000003.pt" and state["step"] == 3


WRITER = textwrap.dedent("""
    import sys, torch
    from maskdit.method import checkpoint
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import tiny_state
    checkpoint.save_checkpoint(sys.argv[1], tiny_state(1))
    big = tiny_state(2)
    big["model"]["big"] = torch.zeros(64 * 2**20)  # 256 MiB: the write takes a while
    print("writing", flush=True)
    checkpoint.save_checkpoint(sys.argv[1], big)
    print("done", flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_write_leaves_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ck), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    partial = []
    def started_writing() -> list[Path]:
        found = []
        for path in ck.glob(".ckpt-000000002.pt*") if ck.is_dir() else []:
            try:
                if path.stat().st_size > 0:
                    found.append(path)
            except FileNotFoundError:  # renamed into place between glob and stat: too late, look again
                pass
        return found

    while not partial and proc.poll() is None and time.monotonic() < deadline:
        partial = started_writing()
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"done" not in out, err.decode()[-2000:]
    assert partial, "the kill did not land during the write"
    assert not (ck / "ckpt-000000002.pt").exists()
    uri, state = checkpoint.load_latest(str(ck))
    assert uri == str(ck / "ckpt-000000001.pt") and state["step"] == 1
    # the next save in the same folder works and wins, and removes what the killed write left
    assert checkpoint.save_checkpoint(str(ck), tiny_state(3)) == checkpoint.latest_checkpoint(str(ck))
    assert not [p for p in ck.iterdir() if p.name.endswith(".partial")]


def test_the_next_save_removes_a_partial_file_a_killed_write_left(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save_checkpoint(str(ck), tiny_state(1))
    stale = ck / ".ckpt-000000002.pt.k1ll3d.partial"  # the name storage's atomic write gives its temp file
    stale.write_bytes(b"x" * 4096)
    other = ck / ".notes.txt.abc.partial"  # not a checkpoint's: left alone
    other.write_bytes(b"y")
    checkpoint.save_checkpoint(str(ck), tiny_state(2), keep_last=3)
    assert not stale.exists() and other.exists()
    assert [step for step, _ in checkpoint.list_checkpoints(str(ck))] == [1, 2]


FULL = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import tiny_state
    import typer
    from maskdit.core.errors import exit_for_restart_policy
    from maskdit.method import checkpoint
    state = tiny_state(2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        with exit_for_restart_policy():  # how `maskdit train` classifies it: 2 permanent, 143 retryable
            checkpoint.save_checkpoint(sys.argv[1], state, keep_last=2)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
""")


def test_a_file_size_limit_while_checkpointing_is_permanent_and_names_the_room_needed(tmp_path):
    """EFBIG (as ENOSPC or a quota): exit 2, not a retryable failure; the message names keep_last + 1 checkpoints."""
    import io
    import re

    buffer = io.BytesIO()
    torch.save({"format_version": checkpoint.FORMAT_VERSION, **tiny_state(2)}, buffer)
    mib = buffer.tell() / 2**20
    assert buffer.tell() > 64 * 1024, "the checkpoint must exceed the limit the test sets"
    proc = subprocess.run([sys.executable, "-c", FULL, str(tmp_path / "ck"), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and "File too large" in line and f"{mib:.1f} MiB" in line, line
    assert re.search(rf"keep_last \+ 1 = 3 checkpoints, about {3 * mib:.1f} MiB", line), line
    assert not list((tmp_path / "ck").iterdir())  # the failed write left nothing behind

"""Sharded checkpoints (maskdit/method/sharded.py, maskdit/train/background.py): the split, the round trip
(local and SeaweedFS, multipart streamed), each kind of bad input as one line naming the files, and SIGKILL
during a background upload under 1 and 2 torchrun ranks with a bitwise resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_checkpoint import tiny_state
from test_train import CLI, ENV1, data, one_thread, states_equal, tiny_config  # noqa: F401 (fixtures)

from maskdit.core import s3, storage, upload
from maskdit.core.config import build_config
from maskdit.core.result import read_result, result_uri
from maskdit.method import checkpoint, sharded
from maskdit.method.model import ModelConfig
from maskdit.train.config import TrainConfig
from maskdit.train.loop import TrainResult
from maskdit.train.loop import run as train


def write_sharded(dir_uri: str, state: dict, world: int, ckpt_id: str = "a" * 32, commit: bool = True) -> str:
    """What `world` ranks write for `state` (each stages its share), committed as rank 0 would."""
    folder = checkpoint.checkpoint_uri(dir_uri, state["step"])
    for rank in range(world):
        sharded.write_shard(folder, sharded.stage(state, rank, world, ckpt_id))
    if commit:
        shards = sharded.stored_shards(folder, world, ckpt_id)
        sharded.commit(folder, ckpt_id, state["step"], world, shards, state["model_config"])
    return folder


def assert_same(a: dict, b: dict) -> None:
    states_equal(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for key in ("data_position", "train_config", "skipped_steps", "model_config"):
        assert a[key] == b[key], key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


# ------------------------------------------------------------------------------ the split and the round trip


def test_the_split_is_disjoint_complete_and_balanced():
    state = tiny_state(3)
    tensors: dict[str, torch.Tensor] = {}
    for key in sharded.SHARDED:
        sharded._flatten(state[key], key, tensors)
    owner = sharded.owners(tensors, 3)
    assert owner.keys() == tensors.keys() and set(owner.values()) == {0, 1, 2}
    loads = [sum(tensors[k].numel() * tensors[k].element_size() for k in owner if owner[k] == r) for r in range(3)]
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    assert max(loads) - min(loads) <= largest  # greedy by size: never more than one tensor apart
    shards = [sharded.stage(state, r, 3, "x" * 32) for r in range(3)]
    names = [set(s["tensors"]) for s in shards]
    assert set().union(*names) == tensors.keys() and sum(map(len, names)) == len(tensors)  # disjoint
    assert shards[0]["skeleton"] is not None and shards[1]["skeleton"] is None


@pytest.mark.parametrize("world", [1, 2, 3])
def test_roundtrip_is_bitwise_for_any_number_of_ranks(tmp_path, world):
    state = tiny_state(7)
    folder = write_sharded(str(tmp_path), state, world)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(7, folder)]
    loaded = checkpoint.load_checkpoint(folder)
    assert loaded["format_version"] == sharded.FORMAT_VERSION
    assert_same(state, loaded)
    assert checkpoint.resolve(str(tmp_path))[0] == folder  # a folder of checkpoints: its newest


def test_staging_copies_so_training_may_go_on(tmp_path):
    state = tiny_state(2)
    shard = sharded.stage(state, 0, 1, "c" * 32)
    for tensor in state["model"].values():
        tensor.add_(1.0)  # the next optimizer step, while the upload runs
    state["rng"]["torch"].zero_()
    sharded.write_shard(checkpoint.checkpoint_uri(str(tmp_path), 2), shard)
    sharded.commit(checkpoint.checkpoint_uri(str(tmp_path), 2), "c" * 32, 2, 1,
                   sharded.stored_shards(checkpoint.checkpoint_uri(str(tmp_path), 2), 1, "c" * 32), {})
    assert_same(tiny_state(2), checkpoint.load_checkpoint(checkpoint.checkpoint_uri(str(tmp_path), 2)))


def test_file_checkpoints_still_load_next_to_sharded_ones(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), tiny_state(4))  # what earlier versions wrote
    write_sharded(str(tmp_path), tiny_state(8), 2)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [4, 8]
    assert_same(tiny_state(4), checkpoint.load_checkpoint(str(tmp_path / "ckpt-000000004.pt")))
    checkpoint.prune(str(tmp_path), 8, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000008"]


def test_s3_roundtrip_streams_multipart_and_an_error_leaves_nothing(bucket, monkeypatch):
    monkeypatch.setattr(s3.SETTINGS, "multipart_chunksize", upload.MIN_PART)
    state = tiny_state(5)
    # 12 MiB (3 parts) in the optimizer's state: the model's and EMA's tensors must fit the model (weights.py)
    state["optimizer"]["state"][10**6] = {"big": torch.arange(3 * 1024 * 1024, dtype=torch.float32)}
    folder = write_sharded(f"s3://{bucket}/run", state, 2)
    objects = {o.uri.rsplit("/", 1)[-1]: o for o in storage.list_objects(folder)}
    big = max((o for n, o in objects.items() if n.startswith("shard-")), key=lambda o: o.size)
    assert big.size > 2 * upload.MIN_PART and "-" in big.version  # a multipart ETag: "<md5>-<parts>"
    assert_same(state, checkpoint.load_checkpoint(folder))

    with pytest.raises(RuntimeError, match="serializer failed"), upload.open_write(f"s3://{bucket}/run/b.pt") as stream:
        stream.write(b"x" * (upload.MIN_PART + 10))  # one part sent already
        raise RuntimeError("serializer failed")
    assert not storage.exists(f"s3://{bucket}/run/b.pt")
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted


# ------------------------------------------------------------------------------ bad input: one line naming files


def _one_line(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def test_half_uploaded_checkpoint_is_not_one(tmp_path):
    write_sharded(str(tmp_path), tiny_state(4), 2)
    folder = write_sharded(str(tmp_path), tiny_state(8), 2, ckpt_id="b" * 32, commit=False)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [4]  # the previous one stays the newest
    assert [s for s, _ in checkpoint.uncommitted(str(tmp_path))] == [8]
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(folder)
    _one_line(error, folder, "COMMIT.json", "did not finish", "shard-00-of-02-bbbbbbbb.pt")


def test_missing_shard(tmp_path):
    folder = write_sharded(str(tmp_path), tiny_state(4), 2)
    (Path(folder) / "shard-01-of-02-aaaaaaaa.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(folder)
    _one_line(error, "shard-01-of-02-aaaaaaaa.pt", "missing")


def test_marker_without_shards_refuses_a_fresh_start(data, tmp_path):
    ck = tmp_path / "ck"
    folder = write_sharded(str(ck), tiny_state(4), 2)
    for shard in Path(folder).glob("shard-*"):
        shard.unlink()
    with pytest.raises(checkpoint.CheckpointError) as error:
        train(build_config(TrainConfig, tiny_config(data, ck, steps=8)))
    _one_line(error, "ckpt-000000004", "none loads", "shard-00-of-02-aaaaaaaa.pt")
    assert sorted(p.name for p in Path(folder).iterdir()) == ["COMMIT.json"]  # nothing written, nothing lost


def test_truncated_shard(tmp_path):
    folder = write_sharded(str(tmp_path), tiny_state(4), 1)
    shard = Path(folder) / "shard-00-of-01-aaaaaaaa.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(folder)
    _one_line(error, str(shard), "half-written")


def test_shard_of_another_run(tmp_path):
    ours = write_sharded(str(tmp_path / "ours"), tiny_state(4), 2)
    theirs = write_sharded(str(tmp_path / "theirs"), tiny_state(4), 2, ckpt_id="f" * 32)
    name = "shard-01-of-02-aaaaaaaa.pt"
    shutil.copy(Path(theirs) / "shard-01-of-02-ffffffff.pt", Path(ours) / name)
    marker = json.loads((Path(ours) / "COMMIT.json").read_text())
    marker["shards"][name] = (Path(ours) / name).stat().st_size  # even with the sizes agreeing
    (Path(ours) / "COMMIT.json").write_text(json.dumps(marker))
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(ours)
    _one_line(error, name, "another checkpoint", "f" * 32)


def test_checkpoint_of_another_model_size(data, tmp_path):
    ck = tmp_path / "ck"
    train(build_config(TrainConfig, tiny_config(data, ck, steps=2)))
    bigger = {"preset": "tiny", "hidden_size": 64, "num_heads": 2}
    with pytest.raises(checkpoint.ModelMismatchError) as error:
        train(build_config(TrainConfig, tiny_config(data, ck, steps=4, model=bigger)))
    first = str(error.value).splitlines()[0]
    assert "ckpt-000000002" in first and "hidden_size" in first
    assert ModelConfig(**checkpoint.load_checkpoint(str(ck / "ckpt-000000002"))["model_config"]).hidden_size != 64


# ------------------------------------------------------------------------------ SIGKILL during the upload


WIDE = {"preset": "tiny", "hidden_size": 512, "num_heads": 4}  # ~25 MB a state copy: an upload takes a while


def _uploading(ck: Path, after: int) -> int | None:
    """Step of a checkpoint folder holding a shard (or a partial one) but no commit marker, past step `after`."""
    for folder in ck.glob("ckpt-*") if ck.is_dir() else []:
        try:
            step = int(folder.name.split("-")[1])
            if step > after and folder.is_dir() and any(folder.iterdir()) and not (folder / "COMMIT.json").exists():
                return step
        except (FileNotFoundError, ValueError):
            pass
    return None


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it at once (torchrun starts its workers in their own sessions)."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _elastic(ranks: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "maskdit.elastic", "--standalone", "--nproc-per-node", str(ranks), "--no-python",
            str(Path(sys.executable).with_name("maskdit")), "train", "--config", str(config)]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_during_a_background_upload_resumes_bitwise(data, tmp_path, ranks):
    """Killed (the whole process group, no grace) while a checkpoint uploads: that checkpoint never counts,
    the previous one is resumed, and the run ends bitwise where an uninterrupted one ends."""
    steps, every = 9, 3
    cfg = tiny_config(data, tmp_path / "straight", steps=steps, model=WIDE, **{"checkpoint.every": every})
    env = {**os.environ, **ENV1}
    configs = {}
    for name in ("straight", "killed"):
        cfg = tiny_config(data, tmp_path / name, steps=steps, model=WIDE, **{"checkpoint.every": every})
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    command = (lambda c: _elastic(ranks, c)) if ranks > 1 else (
        lambda c: [sys.executable, "-c", CLI, "train", "--config", str(c)])
    straight = subprocess.run(command(configs["straight"]), env=env, capture_output=True, text=True, timeout=240)
    assert straight.returncode == 0, straight.stderr[-3000:]

    ck, after = tmp_path / "killed", every  # a committed checkpoint before the kill
    proc = subprocess.Popen(command(configs["killed"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    in_flight, deadline = None, time.monotonic() + 180
    while in_flight is None and proc.poll() is None and time.monotonic() < deadline:
        in_flight = _uploading(ck, after)
        time.sleep(0.001)
    _kill_tree(proc.pid)
    _, err = proc.communicate(timeout=60)
    context = f"{ranks} rank(s), killed while step {in_flight} uploaded"
    assert in_flight is not None, f"the kill did not land during an upload:\n{err.decode()[-3000:]}"
    committed = [s for s, _ in checkpoint.list_checkpoints(str(ck))]
    assert committed and in_flight not in committed and max(committed) < in_flight, (context, committed)

    resumed = subprocess.run(command(configs["killed"]), env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {max(committed)}" in resumed.stderr, context
    assert checkpoint.uncommitted(str(ck)) == [], context  # the abandoned upload was cleaned up
    states_equal(checkpoint.load_checkpoint(read_result(TrainResult, result_uri(str(tmp_path / "straight"))).checkpoint),
                 checkpoint.load_checkpoint(read_result(TrainResult, result_uri(str(ck))).checkpoint))


@pytest.mark.slow
def test_train_to_s3_resumes_bitwise(data, tmp_path, bucket):
    """The loop's own path to SeaweedFS: background shards, commit, prune; stopped by max_wall_s and resumed."""
    ck = f"s3://{bucket}/ck"
    cfg = tiny_config(data, ck, steps=10, **{"checkpoint.every": 2, "checkpoint.keep_last": 2})
    first = train(build_config(TrainConfig, {**cfg, "steps": 5}))
    assert first.checkpoint == checkpoint.checkpoint_uri(ck, 5)
    second = train(build_config(TrainConfig, cfg))
    assert [s for s, _ in checkpoint.list_checkpoints(ck)] == [8, 10] and checkpoint.uncommitted(ck) == []
    straight = train(build_config(TrainConfig, tiny_config(data, tmp_path / "straight", steps=10)))
    states_equal(checkpoint.load_checkpoint(straight.checkpoint), checkpoint.load_checkpoint(second.checkpoint))


def test_a_run_of_file_checkpoints_resumes_bitwise_in_the_sharded_format(data, tmp_path):
    """Nothing already trained is stranded: a folder of ckpt-<step>.pt files continues, now sharded."""
    ck = tmp_path / "ck"
    train(build_config(TrainConfig, tiny_config(data, ck, steps=4, **{"checkpoint.format": "file"})))
    assert [Path(u).name for _, u in checkpoint.list_checkpoints(str(ck))] == ["ckpt-000000004.pt"]
    resumed = train(build_config(TrainConfig, tiny_config(data, ck, steps=8)))
    assert resumed.checkpoint == checkpoint.checkpoint_uri(str(ck), 8)
    straight = train(build_config(TrainConfig, tiny_config(data, tmp_path / "straight", steps=8)))
    states_equal(checkpoint.load_checkpoint(straight.checkpoint), checkpoint.load_checkpoint(resumed.checkpoint))

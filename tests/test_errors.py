"""Every area's user-facing error class is a UserError, and commands turn one into exit code 2."""

import pytest
import typer

from maskdit.core.config import ConfigError
from maskdit.core.distributed import DeviceError
from maskdit.core.errors import UsageError, UserError, exit_on_user_error
from maskdit.core.storage import StorageError
from maskdit.core.tracking_server import TrackingError
from maskdit.data.imagefolders import EncodeError
from maskdit.data.shards import ShardError
from maskdit.evaluation.evaluate import EvalError
from maskdit.evaluation.inception import FIDError
from maskdit.evaluation.sample import SampleError
from maskdit.method.checkpoint import CheckpointError, ModelMismatchError
from maskdit.method.reference import ReferenceCheckpointError
from maskdit.registry.champion import RegistryError
from maskdit.train.loop import NonFiniteError


@pytest.mark.parametrize("cls", [CheckpointError, ModelMismatchError, ConfigError, DeviceError, EncodeError, EvalError,
                                 FIDError, ReferenceCheckpointError, RegistryError, SampleError, ShardError,
                                 StorageError, NonFiniteError, TrackingError, UsageError])
def test_user_errors_exit_2_with_their_message(cls, capsys):
    assert issubclass(cls, UserError)
    with pytest.raises(typer.Exit) as exit_info:
        with exit_on_user_error():
            raise cls("bucket 'b' does not exist; create it")
    assert exit_info.value.exit_code == 2
    assert "bucket 'b' does not exist; create it" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        with exit_on_user_error():
            raise KeyError("not a user error")


def test_mnist_limit_below_one_a_class_is_a_usage_error():
    from typer.testing import CliRunner

    from maskdit.cli import app

    result = CliRunner().invoke(app, ["data", "mnist", "--out", "unused", "--limit", "3"])
    assert result.exit_code == 2 and "--limit 3: keep at least 10 digits" in result.output


@pytest.mark.parametrize(("name", "message"), [("cuda", "'cuda' was asked for but"), ("cuda:0", "'cuda:0' was asked"),
                                               ("tpu", "unknown device 'tpu'"), ("meta", "'meta' is not supported")])
def test_device_errors_are_one_line(name, message, monkeypatch):
    """Issue 16.10: device=cuda without CUDA, or an unknown device, gave a RuntimeError traceback."""
    import torch

    from maskdit.core.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=message) as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


def test_train_on_missing_cuda_exits_2(tmp_path, monkeypatch):
    import torch
    from test_train import make_data
    from typer.testing import CliRunner

    from maskdit.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MASKDIT_DATA_CACHE", str(tmp_path / "cache"))
    data = make_data(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "-c", "mnist_pretrain", f"data.uri={data}", "model=tiny",
                                      f"checkpoint.dir={tmp_path / 'ck'}", "device=cuda"])
    assert result.exit_code == 2, result.output
    assert "'cuda' was asked for but" in result.output and "Traceback" not in result.output

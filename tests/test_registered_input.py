"""A registered model is input too (issue 29.3), and the champion gate's inputs and names (29.4), against a real
MLflow server (tests/fixtures/mlflow_server.py): every crafted or altered version ends in one line, exit 2."""

import shutil
import socket
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from fixtures.tiny_sampler import digits_checkpoint
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.evaluation import sample, sources
from maskdit.method.diffusion import SamplerConfig
from maskdit.method.modelformat import DIGESTS, MODEL_FORMAT, WEIGHTS_ARTIFACT, registered_state
from maskdit.registry import champion
from maskdit.registry.champion import CHAMPION, LOCK_SUFFIX, RegistryError
from maskdit.registry.register import register

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*An input example was not provided")]
FORMAT1 = Path(__file__).parent / "data" / "registered_format1"  # made by `maskdit register` before format 2
SAMPLER = SamplerConfig(num_steps=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("registered-input"))


def _upload(folder: Path, name: str) -> str:
    """`folder` logged as a run's `model` and registered as a new version of `name`: its models:/ URI."""
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version
    return f"models:/{name}/{version}"


def _one_line_exit_2(uri: str, tmp_path: Path, match: str) -> None:
    result = CliRunner().invoke(app, ["sample", f"checkpoint={uri}", "classes=[1]", "n_per_class=1",
                                      "sampler.num_steps=2", f"out={tmp_path / 'g.png'}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "Downloading artifacts" not in line]
    assert len(lines) == 1 and match in lines[0], result.output  # MLflow's progress bars aside
    assert not (tmp_path / "g.png").exists()


def test_registered_weights_are_bf16_safetensors_with_digests_and_an_altered_file_is_refused(trained, tracking,
                                                                                              tmp_path):
    ckpt, dataset = trained
    registered = register(ckpt, 10.0, "input-digests", sampler=SAMPLER, dataset_uri=dataset)
    folder = Path(mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path / "dl")))
    description = yaml.safe_load((folder / "MLmodel").read_text())
    assert description["metadata"]["maskdit_format"] == MODEL_FORMAT == 2
    weights_path = description["flavors"]["python_function"]["artifacts"][WEIGHTS_ARTIFACT]["path"]
    assert weights_path.endswith(".safetensors") and set(description["metadata"][DIGESTS]) == {"weights", "manifest"}
    state = registered_state(registered.model_uri, str(tmp_path / "state"))
    assert set(state) >= {"model_config", "ema", "step"} and state["step"] == 7
    labels, seeds = sample.grid_plan([1], 1)
    source = sources.load_sampler_source(registered.model_uri)
    assert sample.generate(source.precond, source.decode, labels, seeds, SAMPLER, 1).shape == (1, 8, 8, 3)

    data = bytearray((folder / weights_path).read_bytes())
    data[-2] ^= 0x01  # one bit of one weight, as the store could flip it
    (folder / weights_path).write_bytes(bytes(data))
    altered = _upload(folder, "input-digests")
    recorded = description["metadata"][DIGESTS]["weights"]
    with pytest.raises(sample.SampleError, match=f"{altered} \\(weights ema.safetensors\\): sha256 [0-9a-f]{{64}} but "
                                                 f"{recorded} was recorded at registration"):
        sources.load_sampler_source(altered)
    _one_line_exit_2(altered, tmp_path, "was recorded at registration")


def test_a_version_of_the_previous_format_still_loads_with_every_check(tracking, tmp_path):
    uri = _upload(FORMAT1, "input-format1")
    source = sources.load_sampler_source(uri)
    assert source.meta["step"] == 7 and source.config.in_channels == 1
    labels, seeds = sample.grid_plan([3], 2)
    assert sample.generate(source.precond, source.decode, labels, seeds, SAMPLER, 2).shape == (2, 8, 8, 3)
    assert registered_state(uri, str(tmp_path / "warm"))["step"] == 7  # a warm start reads it too

    def altered(change) -> str:
        folder = tmp_path / f"v{time.monotonic_ns()}"
        shutil.copytree(FORMAT1, folder)
        state = torch.load(folder / "artifacts" / "ema.pt", weights_only=True)
        change(state)
        torch.save(state, folder / "artifacts" / "ema.pt")
        return _upload(folder, "input-format1")

    nan = altered(lambda s: s.update(ema={k: torch.full_like(v, float("nan")) for k, v in s["ema"].items()},
                                     model={k: torch.full_like(v, float("nan")) for k, v in s["ema"].items()}))
    _one_line_exit_2(nan, tmp_path, "hold NaN or inf")
    shape = altered(lambda s: s["ema"].update({"final_layer.linear.weight": torch.zeros(5, 5)}))
    _one_line_exit_2(shape, tmp_path, "final_layer.linear.weight (5, 5) != (4, 16)")
    deep = altered(lambda s: s["model_config"].update(depth=1_000_000))
    start = time.monotonic()
    _one_line_exit_2(deep, tmp_path, "depth 1000000 but the file has 2 blocks")
    assert time.monotonic() - start < 30  # refused from the file, not after building a 21 GB network

    for outside in ("../../../../etc/passwd", "/etc/passwd"):
        folder = tmp_path / f"p{time.monotonic_ns()}"
        shutil.copytree(FORMAT1, folder)
        text = (folder / "MLmodel").read_text().replace("path: artifacts/ema.pt", f"path: {outside}")
        (folder / "MLmodel").write_text(text)
        _one_line_exit_2(_upload(folder, "input-format1"), tmp_path, "outside the model's folder")


def test_sampling_from_the_registry_with_mlflow_down_is_one_line_in_seconds(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a closed port: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    start = time.monotonic()  # MLflow down is transient (issue 29.1): retried within the budget, then exit 143
    result = CliRunner().invoke(app, ["sample", "checkpoint=models:/anything@champion", "classes=[1]",
                                      "n_per_class=1", "sampler.num_steps=2", f"out={tmp_path / 'g.png'}"])
    assert result.exit_code == 143, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is unreachable" in lines[0], result.output
    assert time.monotonic() - start < 30  # was 250 s of the client's retries (the tests' budget: 3 s)


def test_only_a_finite_non_negative_fid_registers_and_a_nan_champion_yields(trained, tracking):
    ckpt, dataset = trained
    name = "input-fid"
    for bad in (float("nan"), float("inf"), -3.0):
        with pytest.raises(RegistryError, match="is no distance"):
            register(ckpt, bad, name, sampler=SAMPLER, dataset_uri=dataset)
    assert not tracking.search_registered_models(f"name = '{name}'")  # nothing was registered
    first = register(ckpt, 10.0, name, sampler=SAMPLER, dataset_uri=dataset)
    tracking.set_model_version_tag(name, first.version, "fid", "nan")  # as a version registered before the check
    second = register(ckpt, 461.8, name, sampler=SAMPLER, dataset_uri=dataset)
    assert second.champion and tracking.get_model_version_by_alias(name, CHAMPION).version == second.version


def test_the_champion_lock_never_deletes_a_users_model(trained, tracking, monkeypatch):
    ckpt, dataset = trained
    victim = "adv-victim" + LOCK_SUFFIX  # a user's model whose name is the lock's of `adv-victim`
    run_id = tracking.create_run(tracking.create_experiment("users")).info.run_id
    tracking.create_registered_model(victim)
    tracking.create_model_version(victim, f"runs:/{run_id}/model", run_id=run_id)
    monkeypatch.setattr(champion, "LOCK_STALE_S", 0.0)  # it looks like a dead holder's lock
    with pytest.raises(RegistryError, match=f"{victim}' exists and is not maskdit's lock"):
        register(ckpt, 10.0, "adv-victim", sampler=SAMPLER, dataset_uri=dataset)
    assert [v.version for v in tracking.search_model_versions(f"name = '{victim}'")] == ["1"]  # still there

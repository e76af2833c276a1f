"""Registration in the MLflow Model Registry against a real MLflow server (tests/fixtures/mlflow_server.py)."""

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from fixtures.tiny_sampler import digits_checkpoint
from PIL import Image
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.core.result import read_result
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.evaluation.inception import BUNDLED_SHA256
from maskdit.method.checkpoint import save_checkpoint
from maskdit.method.diffusion import SamplerConfig
from maskdit.method.model import MaskDiT, model_config
from maskdit.registry.champion import CANDIDATE, CHAMPION, LOCK_SUFFIX
from maskdit.registry.register import RegisterResult, register

pytestmark = pytest.mark.slow  # a real MLflow server process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel-space dataset (8x8 gray digits) and an (untrained) checkpoint of a matching model."""
    return digits_checkpoint(tmp_path_factory.mktemp("registry"))


def test_versions_aliases_tags_and_champion(trained, tracking):
    ckpt, dataset = trained
    name = "maskdit-test-aliases"
    first = register(ckpt, 10.0, name, sampler=SamplerConfig(num_steps=4), dataset_uri=dataset, kfp_run_id="run-1")
    assert (first.version, first.champion, first.aliases) == ("1", True, [CANDIDATE, CHAMPION])
    tags = tracking.get_model_version(name, "1").tags
    assert float(tags["fid"]) == 10.0 and tags["cfg_scale"] == "1.5" and tags["num_steps"] == "4"
    assert tags["kfp_run_id"] == "run-1" and tags["checkpoint_uri"] == ckpt
    assert tags["dataset_manifest"] == f"{dataset}/manifest.json"

    worse = register(ckpt, 20.0, name, dataset_uri=dataset, kfp_run_id="run-2")
    assert (worse.version, worse.champion, worse.aliases) == ("2", False, [CANDIDATE])
    assert (worse.previous_champion, worse.previous_champion_fid) == ("1", 10.0)
    assert tracking.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert tracking.get_model_version_by_alias(name, CANDIDATE).version == "2"

    # no evaluation, so no recorded settings: a lower FID does not make it comparable with the champion
    unevaluated = register(ckpt, 5.0, name)  # the dataset from the checkpoint's train_config
    assert (unevaluated.champion, unevaluated.aliases) == (False, [CANDIDATE])
    assert "no recorded evaluation settings" in unevaluated.reason and "champion version 1" in unevaluated.reason
    assert tracking.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert not tracking.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # the lock was released


def _evaluation(ckpt, dataset, tmp_path, fid, **changes) -> EvaluateResult:
    fields = dict(fid=fid, num_samples=100, sampler=SamplerConfig(num_steps=5), seed=0, checkpoint=ckpt, step=7,
                  dataset=dataset, ref_stats="s3://b/ref.npz", ref_stats_sha256="a" * 64, ref_n=50,
                  inception="bundled", inception_sha256=BUNDLED_SHA256, world_size=1, seconds=1.0,
                  grid=str(tmp_path / "grid.png"))
    return EvaluateResult(**{**fields, **changes})


def test_champion_only_from_a_champion_evaluated_under_the_same_settings(trained, tracking, tmp_path):
    ckpt, dataset = trained
    name = "maskdit-test-gate"
    first = register(ckpt, 10.0, name, evaluation=_evaluation(ckpt, dataset, tmp_path, 10.0))
    assert first.champion and first.reason is None
    tags = tracking.get_model_version(name, first.version).tags
    assert (tags["ref_stats_sha256"], tags["inception_sha256"]) == ("a" * 64, BUNDLED_SHA256)

    other_ref = register(ckpt, 2.0, name, evaluation=_evaluation(ckpt, dataset, tmp_path, 2.0,
                                                                  ref_stats_sha256="b" * 64))
    assert (other_ref.champion, other_ref.aliases) == (False, [CANDIDATE])
    assert other_ref.reason == ("champion version 1 was evaluated with ref_stats_sha256=aaaaaaaaaaaa..., "
                                "this one with ref_stats_sha256=bbbbbbbbbbbb...: not comparable")
    fewer = register(ckpt, 2.0, name, evaluation=_evaluation(ckpt, dataset, tmp_path, 2.0, num_samples=50,
                                                              sampler=SamplerConfig(num_steps=5, cfg_scale=4.0)))
    assert not fewer.champion and fewer.reason == ("champion version 1 was evaluated with num_samples=100, "
                                                   "cfg_scale=1.5, this one with num_samples=50, cfg_scale=4.0: "
                                                   "not comparable")
    worse = register(ckpt, 11.0, name, evaluation=_evaluation(ckpt, dataset, tmp_path, 11.0))
    assert not worse.champion and worse.reason == "champion version 1 has FID 10, this one 11"
    better = register(ckpt, 9.0, name, evaluation=_evaluation(ckpt, dataset, tmp_path, 9.0))
    assert better.champion and better.reason is None and better.previous_champion == "1"
    assert tracking.get_model_version_by_alias(name, CHAMPION).version == better.version


def _race(uri: str, rounds: list[tuple[str, str, float, dict]], barrier, results) -> None:
    """One of the racing registrations (a spawned process): the champion gate of an existing version, per round.

    Reading the champion takes 0.05 s for the better version and 0.3 s for the worse one (a slow network), so
    without the lock both read the same champion and the worse one writes last.
    """
    import time

    from maskdit.registry.champion import promote

    client = mlflow.MlflowClient(uri)
    read = client.get_model_version_by_alias
    for name, version, fid, tags in rounds:
        delay = 0.3 if fid > 3.0 else 0.05

        def slow_read(*args, **kwargs):
            try:
                return read(*args, **kwargs)
            finally:  # also when there is no champion yet (MLflow raises)
                time.sleep(delay)

        client.get_model_version_by_alias = slow_read
        client.get_registered_model(name)  # connected before the start line
        barrier.wait()
        results.put((name, version, promote(client, name, version, fid, tags)[0]))


def test_concurrent_registrations_end_with_one_champion_the_better_one(tracking, mlflow_server):
    """Two processes released together by a barrier each try to move `champion` to their version, in
    four rounds (which one is better alternates); without the lock the worse one ends as champion."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no MLflow connections inherited through fork
    settings = {**{k: str(v) for k, v in SamplerConfig().model_dump().items()}, "num_samples": "100",
                "ref_stats_sha256": "a" * 64, "inception_sha256": BUNDLED_SHA256}
    run_id = tracking.create_run(tracking.create_experiment("race")).info.run_id  # the versions' source
    rounds: list[list] = [[], []]  # per racer
    best = {}
    for round in range(4):
        name = f"maskdit-test-race-{round}"
        tracking.create_registered_model(name)
        fids = [4.0, 3.0] if round % 2 else [3.0, 4.0]
        for racer, fid in enumerate(fids):
            version = tracking.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                                    tags={**settings, "fid": str(fid)}).version
            rounds[racer].append((name, version, fid, {**settings, "fid": str(fid)}))
        best[name] = rounds[fids.index(min(fids))][-1][1]
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_race, args=(mlflow_server, mine, barrier, results)) for mine in rounds]
    for racer in racers:
        racer.start()
    won = {(name, version): champion for name, version, champion in (results.get(timeout=120) for _ in range(8))}
    for racer in racers:
        racer.join(30)
        assert racer.exitcode == 0
    for name, version in best.items():
        assert tracking.get_model_version_by_alias(name, CHAMPION).version == version, (name, won)
        assert won[name, version]  # the better one reports that it won (the worse may have held it first)
        assert not tracking.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_a_dead_holders_lock_is_broken_a_live_one_waited_for(tracking, monkeypatch):
    from maskdit.registry import champion as registry

    name = "maskdit-test-lock"
    run_id = tracking.create_run(tracking.create_experiment("lock")).info.run_id
    tracking.create_registered_model(name)
    version = tracking.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags={"fid": "3"}).version
    tracking.create_registered_model(name + LOCK_SUFFIX, tags={registry.LOCK_OF_TAG: name,  # a holder that died
                                                              registry.LOCK_TOKEN_TAG: "dead"})
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 1.0)
    with pytest.raises(registry.RegistryError, match=f"{name}.champion-lock.* was held for 1 s"):
        registry.promote(tracking, name, version, 3.0, {"fid": "3"})  # not stale yet: wait, then give up
    monkeypatch.setattr(registry, "LOCK_STALE_S", 0.0)  # now it is
    assert registry.promote(tracking, name, version, 3.0, {"fid": "3"}) == (True, None, None, None)
    assert tracking.get_model_version_by_alias(name, CHAMPION).version == version
    assert not tracking.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_champion_loads_as_pyfunc_and_returns_images(trained, tracking):
    ckpt, dataset = trained
    name = "maskdit-test-pyfunc"
    register(ckpt, 3.0, name, sampler=SamplerConfig(num_steps=3), dataset_uri=dataset)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = model.predict(pd.DataFrame({"class_label": [1, 7, 1], "seed": [0, 1, 0]}))
    assert list(out["class_label"]) == [1, 7, 1] and list(out["num_steps"]) == [3, 3, 3]
    images = [np.asarray(Image.open(io.BytesIO(png))) for png in out["image"]]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image in images)
    assert np.array_equal(images[0], images[2])  # same label and seed, same picture
    # seed and the sampler settings are optional; the registered ones are the defaults
    assert len(model.predict(pd.DataFrame({"class_label": [2]}))) == 1
    with pytest.raises(Exception, match="class_label"):
        model.predict(pd.DataFrame({"class_label": [12]}))


def test_register_command_registers_what_an_evaluation_scored(trained, tracking, monkeypatch, tmp_path):
    ckpt, dataset = trained
    evaluation = EvaluateResult(fid=4.5, num_samples=100, sampler=SamplerConfig(cfg_scale=2.0, num_steps=5), seed=0,
                                checkpoint=ckpt, step=7, dataset=dataset, ref_stats="s3://b/ref.npz", ref_n=50,
                                inception="bundled", world_size=1, seconds=1.0, grid=str(tmp_path / "grid.png"))
    evaluation.write(str(tmp_path / "eval" / "result.json"))
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=maskdit-test-cli",
                                      "kfp_run_id=run-9"])
    assert result.exit_code == 0, result.output
    written = read_result(RegisterResult, str(tmp_path / "eval" / "register" / "result.json"))
    assert written.version == "1" and written.champion and written.model_uri == "models:/maskdit-test-cli/1"
    assert written.fid == 4.5 and "registered maskdit-test-cli version 1" in result.output
    tags = tracking.get_model_version("maskdit-test-cli", "1").tags
    assert (tags["cfg_scale"], tags["num_steps"], tags["ref_stats"], tags["num_samples"]) == \
        ("2.0", "5", "s3://b/ref.npz", "100")

    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'nowhere'}", "name=x"])
    assert result.exit_code == 2 and "no step result at" in result.output and "nowhere" in result.output
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=x"])
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI" in result.output


def test_register_fails_fast_when_mlflow_is_unreachable(trained, monkeypatch, tmp_path):
    """Issue 16.7/16.10: with the server down, register retried for 250 s, then printed a 472-line traceback.
    Issue 29.1: a server that is down is transient: retried within MASKDIT_RETRY_BUDGET_S (3 s in the tests),
    then exit 143 so the step is restarted, never 2."""
    import socket
    import time

    ckpt, dataset = trained
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:hunter2@127.0.0.1:{port}")
    started = time.monotonic()
    EvaluateResult(fid=4.5, num_samples=10, sampler=SamplerConfig(), seed=0, checkpoint=ckpt, dataset=dataset,
                   ref_stats="ref.npz", inception="bundled", world_size=1, seconds=1.0,
                   grid=str(tmp_path / "g.png")).write(str(tmp_path / "eval" / "result.json"))
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'eval'}", "name=down"])
    assert time.monotonic() - started < 30
    assert result.exit_code == 143, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"MLflow at http://127.0.0.1:{port} is unreachable" in lines[0]
    assert "hunter2" not in result.output


def test_a_sqlite_store_registers_a_challenger_too(trained, tmp_path, monkeypatch):
    """The demo's store: sqlite gives versions as ints, a tracking server as strings; both must work."""
    ckpt, dataset = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    evaluation = EvaluateResult(fid=4.5, num_samples=10, sampler=SamplerConfig(), seed=0, checkpoint=ckpt,
                                dataset=dataset, ref_stats="ref.npz", ref_stats_sha256="a" * 64, inception="bundled",
                                inception_sha256="b" * 64, world_size=1, seconds=1.0, grid=str(tmp_path / "g.png"))
    first = register(ckpt, 4.5, "sqlite-model", evaluation=evaluation)
    second = register(ckpt, 3.0, "sqlite-model", evaluation=evaluation.model_copy(update={"fid": 3.0}))
    assert (first.version, first.champion) == ("1", True)
    assert (second.version, second.champion, second.previous_champion) == ("2", True, "1")


def test_the_version_comes_from_the_training_run_with_its_card_metrics_code_and_requirements(trained, tracking,
                                                                                             tmp_path):
    """Issue 13.3: source = the run that trained the checkpoint, the evaluation's numbers on the model, a model
    card as description, an input example, the maskdit code and pinned requirements inside."""
    import hashlib

    import torch

    from maskdit.registry.bundle import requirements

    _, dataset = trained
    experiment = tracking.create_experiment("train-and-evaluate")
    train_run = tracking.create_run(experiment, run_name="tune").info.run_id
    tracking.set_terminated(train_run, "FINISHED", end_time=1_700_000_000_000)
    evaluate_run = tracking.create_run(experiment, run_name="evaluate").info.run_id
    cfg = model_config("tiny", in_channels=1)
    weights = MaskDiT(cfg).state_dict()
    ckpt = save_checkpoint(str(tmp_path / "tune"), {
        "model_config": cfg.model_dump(), "model": weights, "ema": weights, "optimizer": None, "step": 30,
        "tracking_run_id": train_run, "train_config": {
            "data": {"uri": dataset}, "init_from": "/nowhere/pretrain/ckpt-000012345.pt",
            "mask": {"ratio": 0.0, "schedule": "zero"}, "batch": {"global_batch": 16}, "optim": {"lr": 5e-5}}})
    evaluation = _evaluation(ckpt, dataset, tmp_path, 7.5, precision=0.25, recall=0.5, run_id=evaluate_run)
    name = "maskdit-test-card"
    result = register(ckpt, 7.5, name, evaluation=evaluation, kfp_run_id="run-3")

    version = tracking.get_model_version(name, result.version)
    assert version.run_id == train_run == result.run_id == version.tags["train_run_id"]
    assert version.tags["evaluate_run_id"] == evaluate_run
    assert tracking.get_run(train_run).info.end_time == 1_700_000_000_000  # the training run is left as it was
    assert tracking.get_run(train_run).info.status == "FINISHED"
    manifest_sha256 = hashlib.sha256((Path(dataset) / "manifest.json").read_bytes()).hexdigest()
    assert version.tags["manifest_sha256"] == manifest_sha256
    card = version.description
    for shown in (dataset, manifest_sha256, "| samples | 20 (", "tiny", "`/nowhere/pretrain/ckpt-000012345.pt` "
                  "(step 12,345)", "30 steps, mask ratio 0.0 (zero)", "| FID | 7.5 |", "100 (seed 0)",
                  "a" * 64, BUNDLED_SHA256, "0.25 / 0.5", "5 Heun steps, CFG scale 1.5",
                  f'mlflow.pyfunc.load_model("models:/{name}@champion")',
                  f"mlflow models serve -m models:/{name}@champion", "/invocations"):
        assert shown in card, shown

    assert version.source.startswith("models:/m-")  # MLflow 3: the logged model, whose metrics the registry shows
    logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == train_run
    assert {(m.key, m.value, m.run_id, m.step) for m in logged.metrics} == {
        ("fid", 7.5, evaluate_run, 30), ("precision", 0.25, evaluate_run, 30), ("recall", 0.5, evaluate_run, 30)}

    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{result.version}", dst_path=str(tmp_path / "m")))
    copied = files / "code" / "maskdit" / "registry" / "register.py"
    assert copied.read_text() == Path(register.__code__.co_filename).read_text()
    assert not list((files / "code").rglob("__pycache__")) and (files / "code" / "maskdit" / "configs").is_dir()
    assert (files / "requirements.txt").read_text().split() == requirements(latent=False)
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements(latent=False)
    assert pd.read_json(files / "input_example.json", orient="split").columns.tolist() == ["class_label", "seed"]
    assert (files / "serving_input_example.json").is_file()


def test_a_latent_models_vae_is_inside_it(tracking, tmp_path, monkeypatch):
    """The VAE is saved into the model: both loaders decode with that copy after the original is gone."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from maskdit.data.encode import EncodeConfig, encode
    from maskdit.evaluation.sources import load_registered

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    encode(EncodeConfig(input=str(tmp_path / "images"), out=str(tmp_path / "dataset"), vae=str(tmp_path / "vae"),
                        resolution=16, device="cpu", workers=1, progress=False))  # latents 4 x 8 x 8
    cfg = model_config("tiny", num_classes=2)
    weights = MaskDiT(cfg).state_dict()
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), {"model_config": cfg.model_dump(), "model": weights,
                                                    "ema": weights, "optimizer": None, "step": 3,
                                                    "train_config": {"data": {"uri": str(tmp_path / "dataset")}}})
    name = "maskdit-test-latent"
    register(ckpt, 3.0, name, sampler=SamplerConfig(num_steps=2))
    shutil.rmtree(tmp_path / "vae")  # only the model's copy is left

    out = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(pd.DataFrame({"class_label": [0, 1]}))
    assert [np.asarray(Image.open(io.BytesIO(png))).shape for png in out["image"]] == [(16, 16, 3)] * 2
    source = load_registered(f"models:/{name}@{CHAMPION}")
    x0 = torch.zeros(1, 4, 8, 8)  # (B, C, h, w)
    assert source.decode(x0).shape == (1, 16, 16, 3)
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "m")))
    assert (files / "artifacts" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert {"diffusers", "safetensors"} <= {r.split("==")[0] for r in (files / "requirements.txt").read_text().split()}

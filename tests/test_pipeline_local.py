"""The whole DAG with KFP's local runner: S3 (SeaweedFS), a real MLflow server, torchrun on CPU.

Three backends, each run once: the first test's DAG runs on a stand-in Kubernetes API server
(tests/fixtures/k8s_api.py) as Trainer v2 TrainJobs, the weekly retrain's two DAGs on one that serves
only PyTorchJobs (`job_api=auto` finds them), the missed threshold's with the local backend. On the
stand-in the steps find the cluster through $KUBECONFIG (no service-account token), and its kubelet
runs each job's master command for real (torchrun); `_check_the_cluster` makes the same checks for
both kinds.

A tiny configuration: 50 MNIST digits at 32x32, a few training steps, 16 samples for FID (Inception
on CPU is the slow part: about 0.25 s an image).
"""

import base64
import io
import json
import math
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from fixtures.k8s_api import JobScript, K8sApiServer, as_the_cluster, manifest_errors
from PIL import Image

from components.launch_base import POLL_ENV
from components.pytorchjob import RUN_ID_LABEL, STEP_LABEL, label_value
from maskdit.core import storage
from pipelines.cli import run_local

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = ["batch.global_batch=16", "log_every=1",
        # a 2 x 2 grid at steps 3 and 6 (2 sampler steps); no quick FID here (tests/test_monitor.py has it)
        "monitor.grid_every=3", "monitor.grid_classes=[1,7]", "monitor.grid_columns=2", "monitor.sampler.num_steps=2",
        "monitor.fid_samples=0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from maskdit.data.mnist import write_mnist

    root = tmp_path_factory.mktemp("digits") / "mnist"
    write_mnist(str(root), 50)
    return str(root)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """`start(kinds)`: a stand-in API server serving those training-job APIs, made the cluster of the DAG's steps
    (as_the_cluster); its kubelet runs each job's master command here. Stopped after the test."""
    servers = []

    def start(kinds: tuple[str, ...]) -> K8sApiServer:
        server = K8sApiServer(kinds=kinds, run_pods=True).start()
        servers.append(server)
        server.default_script = JobScript(log_lines=[], worker_lines=[])  # the master's log is the command's own
        as_the_cluster(server, tmp_path / "kubeconfig", monkeypatch)
        monkeypatch.setenv(POLL_ENV, "0.2")  # the launcher looks at its job 5 times a second, not every 15 s
        return server

    yield start
    for server in servers:
        server.stop()


def _on_the_cluster(job_api: str, gpus_per_node: int = 0) -> dict:
    """The pipeline's cluster parameters for the stand-in: small pods (it schedules nothing; its kubelet runs the
    master on this machine's CPU, one process a GPU)."""
    return {"backend": "kubernetes", "job_api": job_api, "namespace": "default", "gpus_per_node": gpus_per_node,
            "cpu_request": "1", "cpu_limit": "", "memory_request": "1Gi", "memory_limit": "4Gi", "shm_size": "1Gi"}


def _check_the_cluster(server: K8sApiServer, kind: str, version, stages: list[str]) -> None:
    """What one DAG run on the kubernetes backend left, the same for either kind: the model `version` registered
    with its FID; a job of `kind` for each step in `stages` that ran as one, valid against the CRD (the stand-in
    answers 422 to any other: checked again here), a TrainJob on the ClusterTrainingRuntime `maskdit`; the exit
    handler deleted every job of the run, and no job's pod runs on."""
    from maskdit.core.result import read_result
    from maskdit.evaluation.evaluate import EvaluateResult

    run_id, run_dir = version.tags["kfp_run_id"], version.tags["checkpoint_uri"].split("/tune/")[0]
    assert float(version.tags["fid"]) == pytest.approx(read_result(EvaluateResult, f"{run_dir}/evaluate/result.json")
                                                       .fid, rel=1e-5)
    ours = [job for job in server.created if job["metadata"]["labels"][RUN_ID_LABEL] == label_value(run_id)]
    assert sorted(job["metadata"]["labels"][STEP_LABEL] for job in ours) == sorted(stages)
    for job in ours:
        assert job["kind"] == kind and manifest_errors(job) == []
        if kind == "TrainJob":
            assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                                 "name": "maskdit"} and "maskdit" in server.runtimes
        name = job["metadata"]["name"]
        assert ("default", name) not in server.jobs  # the exit handler's delete_run_jobs
        assert any(method == "DELETE" and path.endswith(f"/{name}") for method, path in server.requests)
    assert all(process.poll() is not None for process, _ in server.processes.values())  # no master runs on
    for (_, pod), container in server.containers.items():  # pods of jobs that stay (an encode job): ended
        assert "terminated" in container.state, pod


def _job_log(folder: str) -> str:
    """The one replica log a job left in `<folder>/logs` (the master pod's on Kubernetes, local.log here)."""
    (uri,) = storage.list_uris(f"{folder}/logs/")
    return storage.get_bytes(uri).decode()


def _arguments(digits, bucket, name, experiment, fid_threshold):
    return dict(images=digits, store_uri=f"s3://{bucket}", resolution=32, pixel_space=True, grayscale=True,
                pretrain_config="mnist_pretrain", pretrain_overrides=["steps=6", "checkpoint.every=3", *TINY],
                tune_config="mnist_tune", tune_overrides=["steps=3", "checkpoint.every=3", *TINY],
                local_nproc=1, ref_stats="", num_samples=16, sampler={"cfg_scale": 1.5, "num_steps": 3},
                fid_threshold=fid_threshold, model_name=name, experiment=experiment,
                encode_as_job=False, evaluate_as_job=False)  # in the step's process; the first test: as jobs


def test_dag_trains_evaluates_and_registers(digits, bucket, tracking, tmp_path, stand_in):
    """The whole DAG as on a current Kubeflow: encode, pretrain, tune and evaluate each a TrainJob (job_api=trainjob
    on a cluster that serves both kinds) of 2 processes (gpus_per_node=2, run on the CPU)."""
    name, experiment = "maskdit-local-dag", "pipeline-local"
    server = stand_in(("trainjob", "pytorchjob"))
    run_local({**_arguments(digits, bucket, name, experiment, fid_threshold=1e6), **_on_the_cluster("trainjob", 2),
               "encode_as_job": True, "evaluate_as_job": True}, tmp_path / "kfp")

    version = tracking.get_model_version_by_alias(name, "champion")
    assert version.version == "1" and sorted(version.aliases) == ["candidate", "champion"]
    tags = version.tags
    assert 0 < float(tags["fid"]) <= 1e6 and tags["cfg_scale"] == "1.5" and tags["num_steps"] == "3"
    assert tags["checkpoint_uri"].startswith(f"s3://{bucket}/runs/") and "/tune/" in tags["checkpoint_uri"]
    from maskdit.data.encode import EncodeConfig, fingerprint  # the dataset's folder is named by its identity

    identity = fingerprint(EncodeConfig(input=digits, out="", resolution=32, pixel_space=True, grayscale=True))
    assert tags["dataset_manifest"] == f"s3://{bucket}/datasets/{identity.name}/manifest.json"
    assert storage.exists(tags["checkpoint_uri"]) or storage.exists(f"{tags['checkpoint_uri']}/COMMIT.json")  # file or sharded

    # each step's typed result lies beside its outputs on the store; the DAG read them, not logs
    from maskdit.core.result import read_result
    from maskdit.evaluation.evaluate import EvaluateResult
    from maskdit.registry.register import RegisterResult
    from maskdit.train.loop import TrainResult

    run_dir = tags["checkpoint_uri"].split("/tune/")[0]
    assert read_result(TrainResult, f"{run_dir}/pretrain/result.json").step == 6
    assert read_result(TrainResult, f"{run_dir}/tune/result.json").checkpoint == tags["checkpoint_uri"]
    evaluation = read_result(EvaluateResult, f"{run_dir}/evaluate/result.json")
    # the version's tag holds the FID to 6 significant digits (f"{fid:.6g}"): off by at most 5e-6 relative
    assert evaluation.fid == pytest.approx(float(tags["fid"]), rel=1e-5) and evaluation.sampler.num_steps == 3
    assert evaluation.world_size == 2  # the evaluation job's two ranks; its log lies beside its result
    assert f"FID {evaluation.fid:.4g}" in _job_log(f"{run_dir}/evaluate")
    dataset = tags["dataset_manifest"].rsplit("/", 1)[0]
    assert "samples of shape" in _job_log(f"{dataset}/job")  # the encode job's
    assert read_result(RegisterResult, f"{run_dir}/evaluate/register/result.json").version == "1"
    # the version's source is the tune run, with the evaluate run's metrics (issue 13.3)
    assert version.run_id == read_result(TrainResult, f"{run_dir}/tune/result.json").run_id is not None
    assert tags["evaluate_run_id"] == evaluation.run_id is not None and "## FID" in version.description

    # one MLflow parent run per pipeline run, closed by the exit step; the steps nest under it
    (parent,) = tracking.search_runs([tracking.get_experiment_by_name(experiment).experiment_id],
                                     "tags.`kfp.run_id` = '" + tags["kfp_run_id"] + "'")
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp.state"] == "SUCCEEDED"
    children = tracking.search_runs([parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) >= 3  # pretrain, tune, register (and evaluate when it tracks)

    # the KFP UI's artifacts: FID metrics and the sample grid embedded in HTML
    page = next((tmp_path / "kfp").glob("*/evaluate/samples")).read_text()
    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1))
    assert Image.open(io.BytesIO(png)).size[0] >= 32

    # pretrain and tune in the KFP UI: Metrics with the numbers of their result.json, a Markdown card with
    # the MLflow run's link and the last sample grid
    for stage, steps in (("pretrain", 6), ("tune", 3)):
        trained = read_result(TrainResult, f"{run_dir}/{stage}/result.json")
        task = next((tmp_path / "kfp").glob(f"*/{stage}"))
        output = json.loads((task / "executor_output.json").read_text())
        shown = output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert shown["steps"] == steps == trained.step and shown["skipped_steps"] == 0
        assert shown["loss"] == pytest.approx(trained.metrics["loss"]) and math.isfinite(shown["loss"])
        assert shown["img_per_s"] == pytest.approx(trained.metrics["img_per_s"]) and shown["img_per_s"] > 0
        assert shown["wall_time_s"] == pytest.approx(trained.seconds) and shown["wall_time_s"] > 0
        card = (task / "card").read_text()
        run = tracking.get_run(trained.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert f"({mlflow.get_tracking_uri()}/#/experiments/{run.info.experiment_id}/runs/" \
               f"{trained.run_id})" in card
        grid = Image.open(io.BytesIO(base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", card).group(1))))
        assert trained.grid.endswith(f"/{stage}/monitor/grid-{steps:09d}.png") and grid.size[0] >= 2 * 32
        assert storage.get_bytes(trained.grid) == base64.b64decode(re.search(r"base64,([^)]+)\)", card).group(1))

    # the cluster: four TrainJobs; the encode job, named by the dataset, is not the run's and stays (its owner, the
    # step's pod, takes it along on a cluster), finished
    _check_the_cluster(server, "TrainJob", version, ["pretrain", "tune", "evaluate"])
    (encoded,) = [job for job in server.created if job["metadata"]["labels"][STEP_LABEL] == "encode"]
    assert encoded["kind"] == "TrainJob" and encoded["metadata"]["labels"][RUN_ID_LABEL] == label_value(identity.digest)
    assert [c["type"] for c in server.jobs[("default", encoded["metadata"]["name"])]["status"]["conditions"]
            if c["status"] == "True"] == ["Created", "Complete"]

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1], "num_steps": [2, 2]}))
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"]]
    assert [image.shape for image in images] == [(32, 32, 3), (32, 32, 3)]


@pytest.fixture(scope="module")
def ref_stats(digits, tmp_path_factory):
    """Reference statistics of 8 of the digits, computed once: the runs below compare FIDs or only gate on one."""
    from maskdit.evaluation import fid

    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    return fid.run(fid.FIDStatsConfig(source=digits, out=str(out), limit=8, device="cpu", progress=False)).stats


def test_a_run_that_misses_the_fid_threshold_registers_nothing(digits, bucket, tracking, ref_stats, tmp_path):
    """The gate alone: tuning 2 steps of a given checkpoint (the first test covers pretraining), FID of 8 samples."""
    name = "maskdit-local-dag-missed"
    run_local({**_arguments(digits, bucket, name, "pipeline-local", fid_threshold=0.0), "ref_stats": ref_stats,
               "num_samples": 8, "tune_init_from": _untrained_checkpoint(tmp_path / "given"),
               "tune_overrides": ["steps=2", "checkpoint.every=2", *TINY]}, tmp_path / "kfp")
    assert list((tmp_path / "kfp").glob("*/evaluate/samples"))  # it did evaluate
    assert not list((tmp_path / "kfp").glob("*/register"))
    assert tracking.search_registered_models(f"name = '{name}'") == []


def _untrained_checkpoint(folder) -> str:
    """Initial weights of mnist_tune's model as a checkpoint (no pretraining: the first test covers that)."""
    import torch

    from maskdit.core.config import load_config
    from maskdit.method import checkpoint
    from maskdit.method.model import MaskDiT
    from maskdit.train.config import TrainConfig, preset_path

    model = load_config(TrainConfig, preset_path("mnist_tune"), ["data.uri=unused", "checkpoint.dir=unused"]).model
    torch.manual_seed(0)
    weights = MaskDiT(model).state_dict()
    return checkpoint.save_checkpoint(str(folder), {"model_config": model.model_dump(), "model": weights,
                                                    "ema": weights, "step": 0})


def test_a_weekly_retrain_warm_starts_from_the_champion(digits, bucket, tracking, ref_stats, tmp_path, stand_in):
    """The DAG twice, as a recurring retrain runs it, on a cluster with the Training Operator only (job_api=auto
    finds the PyTorchJob). Both skip pretraining (tune_init_from): the first tunes a given checkpoint and registers
    the champion; the second tunes models:/<name>@champion for its own steps and registers again. MLflow shows the
    second run's steps and where its weights came from."""
    from maskdit.core.result import read_result
    from maskdit.train.loop import TrainResult

    name, experiment = "maskdit-local-retrain", "pipeline-local-retrain"
    server = stand_in(("pytorchjob",))
    first = {**_arguments(digits, bucket, name, experiment, fid_threshold=1e6), **_on_the_cluster("auto"),
             "ref_stats": ref_stats, "num_samples": 8, "tune_init_from": _untrained_checkpoint(tmp_path / "given"),
             "tune_overrides": ["steps=2", "checkpoint.every=2", *TINY]}
    run_local(first, tmp_path / "kfp-1")
    champion = tracking.get_model_version_by_alias(name, "champion")
    _check_the_cluster(server, "PyTorchJob", champion, ["tune"])  # encode and evaluate in their steps' processes

    second = {**first, "tune_init_from": f"models:/{name}@champion",
              "tune_overrides": ["steps=3", "checkpoint.every=3", *TINY]}
    run_local(second, tmp_path / "kfp-2")

    latest = tracking.get_model_version(name, "2")
    _check_the_cluster(server, "PyTorchJob", latest, ["tune"])
    assert "candidate" in latest.aliases and latest.tags["kfp_run_id"] != champion.tags["kfp_run_id"]
    run_dir = latest.tags["checkpoint_uri"].split("/tune/")[0]
    assert not storage.exists(f"{run_dir}/pretrain/result.json")  # no pretraining
    tuned = read_result(TrainResult, f"{run_dir}/tune/result.json")
    assert tuned.step == 3 and tuned.checkpoint == latest.tags["checkpoint_uri"]
    assert (tuned.init_from.uri, tuned.init_from.resolved) == (f"models:/{name}@champion", f"models:/{name}/1")
    assert tuned.init_from.step == 2  # version 1 is the first run's tuning after its 2 steps

    # MLflow: the second pipeline run's tuning run, its step count and its lineage
    run = tracking.get_run(tuned.run_id)
    assert run.data.tags["init_from.resolved"] == f"models:/{name}/1"
    assert run.data.tags["init_from.run_id"] == champion.run_id  # the run that registered version 1
    assert run.data.params["steps"] == "3" and run.data.params["init_from"] == f"models:/{name}@champion"
    assert [m.step for m in tracking.get_metric_history(tuned.run_id, "loss")] == [1, 2, 3]
    (parent,) = tracking.search_runs([run.info.experiment_id],
                                     "tags.`kfp.run_id` = '" + latest.tags["kfp_run_id"] + "'")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id

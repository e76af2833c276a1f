"""The whole DAG with KFP's local runner as on a current Kubeflow: S3 (SeaweedFS), a real MLflow server, and a
stand-in Kubernetes API server (tests/fixtures/k8s_api.py) serving Trainer v2 TrainJobs, whose kubelet runs each
job's master command for real (torchrun on the CPU). The steps find the cluster through $KUBECONFIG (no
service-account token). tests/test_pipeline_retrain.py has the other two backends (PyTorchJobs, and local) and the
FID gate; the fixtures and checks both use are in tests/fixtures/pipeline_dag.py. The DAG runs are split over two
files so that `make test`'s two processes (one file each at a time) both run one from the start.
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
from fixtures.pipeline_dag import check_the_cluster, dag_arguments, job_log, on_the_cluster
from PIL import Image

from components.pytorchjob import RUN_ID_LABEL, STEP_LABEL, label_value
from maskdit.core import storage
from pipelines.cli import run_local

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_dag_trains_evaluates_and_registers(dag_digits, bucket, tracking, tmp_path, dag_cluster):
    """The whole DAG as on a current Kubeflow: encode, pretrain, tune and evaluate each a TrainJob (job_api=trainjob
    on a cluster that serves both kinds) of 2 processes (gpus_per_node=2, run on the CPU)."""
    name, experiment = "maskdit-local-dag", "pipeline-local"
    server = dag_cluster(("trainjob", "pytorchjob"))
    run_local({**dag_arguments(dag_digits, bucket, name, experiment, fid_threshold=1e6),
               **on_the_cluster("trainjob", 2), "encode_as_job": True, "evaluate_as_job": True}, tmp_path / "kfp")

    version = tracking.get_model_version_by_alias(name, "champion")
    assert version.version == "1" and sorted(version.aliases) == ["candidate", "champion"]
    tags = version.tags
    assert 0 < float(tags["fid"]) <= 1e6 and tags["cfg_scale"] == "1.5" and tags["num_steps"] == "3"
    assert tags["checkpoint_uri"].startswith(f"s3://{bucket}/runs/") and "/tune/" in tags["checkpoint_uri"]
    from maskdit.data.encode import EncodeConfig, fingerprint  # the dataset's folder is named by its identity

    identity = fingerprint(EncodeConfig(input=dag_digits, out="", resolution=32, pixel_space=True, grayscale=True))
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
    assert f"FID {evaluation.fid:.4g}" in job_log(f"{run_dir}/evaluate")
    dataset = tags["dataset_manifest"].rsplit("/", 1)[0]
    assert "samples of shape" in job_log(f"{dataset}/job")  # the encode job's
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
    check_the_cluster(server, "TrainJob", version, ["pretrain", "tune", "evaluate"])
    (encoded,) = [job for job in server.created if job["metadata"]["labels"][STEP_LABEL] == "encode"]
    assert encoded["kind"] == "TrainJob" and encoded["metadata"]["labels"][RUN_ID_LABEL] == label_value(identity.digest)
    assert [c["type"] for c in server.jobs[("default", encoded["metadata"]["name"])]["status"]["conditions"]
            if c["status"] == "True"] == ["Created", "Complete"]

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1], "num_steps": [2, 2]}))
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"]]
    assert [image.shape for image in images] == [(32, 32, 3), (32, 32, 3)]

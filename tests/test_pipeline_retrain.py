"""The whole DAG with KFP's local runner, twice as a weekly retrain (on a stand-in API server that serves only
PyTorchJobs: `job_api=auto` finds them) and once with a missed FID threshold (the local backend). S3 (SeaweedFS), a
real MLflow server, torchrun on the CPU. tests/test_pipeline_local.py has the TrainJob run; the fixtures and checks
both use are in tests/fixtures/pipeline_dag.py.
"""

import pytest
from fixtures.pipeline_dag import TINY, check_the_cluster, dag_arguments, on_the_cluster, untrained_checkpoint

from maskdit.core import storage
from pipelines.cli import run_local

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_run_that_misses_the_fid_threshold_registers_nothing(dag_digits, bucket, tracking, dag_ref_stats, tmp_path):
    """The gate alone: tuning 2 steps of a given checkpoint (the first test covers pretraining), FID of 8 samples."""
    name = "maskdit-local-dag-missed"
    run_local({**dag_arguments(dag_digits, bucket, name, "pipeline-local", fid_threshold=0.0),
               "ref_stats": dag_ref_stats, "num_samples": 8, "tune_init_from": untrained_checkpoint(tmp_path / "given"),
               "tune_overrides": ["steps=2", "checkpoint.every=2", *TINY]}, tmp_path / "kfp")
    assert list((tmp_path / "kfp").glob("*/evaluate/samples"))  # it did evaluate
    assert not list((tmp_path / "kfp").glob("*/register"))
    assert tracking.search_registered_models(f"name = '{name}'") == []


def test_a_weekly_retrain_warm_starts_from_the_champion(dag_digits, bucket, tracking, dag_ref_stats, tmp_path,
                                                        dag_cluster):
    """The DAG twice, as a recurring retrain runs it, on a cluster with the Training Operator only (job_api=auto
    finds the PyTorchJob). Both skip pretraining (tune_init_from): the first tunes a given checkpoint and registers
    the champion; the second tunes models:/<name>@champion for its own steps and registers again. MLflow shows the
    second run's steps and where its weights came from."""
    from maskdit.core.result import read_result
    from maskdit.train.loop import TrainResult

    name, experiment = "maskdit-local-retrain", "pipeline-local-retrain"
    server = dag_cluster(("pytorchjob",))
    first = {**dag_arguments(dag_digits, bucket, name, experiment, fid_threshold=1e6), **on_the_cluster("auto"),
             "ref_stats": dag_ref_stats, "num_samples": 8, "tune_init_from": untrained_checkpoint(tmp_path / "given"),
             "tune_overrides": ["steps=2", "checkpoint.every=2", *TINY]}
    run_local(first, tmp_path / "kfp-1")
    champion = tracking.get_model_version_by_alias(name, "champion")
    check_the_cluster(server, "PyTorchJob", champion, ["tune"])  # encode and evaluate in their steps' processes

    second = {**first, "tune_init_from": f"models:/{name}@champion",
              "tune_overrides": ["steps=3", "checkpoint.every=3", *TINY]}
    run_local(second, tmp_path / "kfp-2")

    latest = tracking.get_model_version(name, "2")
    check_the_cluster(server, "PyTorchJob", latest, ["tune"])
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

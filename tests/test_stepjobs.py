"""Encode and evaluate as jobs (components/stepjobs.py): their manifests against the PyTorchJob CRD, their
commands read back by the CLI's own config parser, and a result that is not the one asked for refused."""

import pytest
from fixtures.k8s_api import crd_validator, manifest_errors, restricted_violations

from components.cluster import ClusterSettings
from components.pytorchjob import build_pytorchjob
from components.stepjobs import check_evaluation, encode_command, evaluate_command, step_job
from components.steps import job_plan
from maskdit.core.config import load_config
from maskdit.data.encode import EncodeConfig
from maskdit.evaluation.evaluate import EvalError, EvaluateConfig, EvaluateResult
from maskdit.method.diffusion import SamplerConfig

DIGEST = "1234567890" * 6 + "1234"  # digits only: YAML would read it as a number if it were not quoted


def _parsed(model, command):
    return load_config(model, None, command[2:])  # what `maskdit encode|evaluate key=value ...` does


def test_commands_round_trip_through_the_cli_parser():
    encode = _parsed(EncodeConfig, encode_command("s3://b/imagenet/train", "s3://b/datasets/x", 256,
                                                  "stabilityai/sd-vae-ft-mse", False, False, DIGEST))
    assert encode.input == "s3://b/imagenet/train" and encode.dataset_id == DIGEST and encode.resolution == 256
    assert encode.device is None and encode.progress is False  # each rank: its local GPU, else the CPU
    sampler = {"cfg_scale": 1.5, "num_steps": 40, "precision": "bf16"}
    evaluate = _parsed(EvaluateConfig, evaluate_command("s3://b/runs/r/tune/ckpt-1.pt", "s3://b/datasets/x", "",
                                                        "s3://b/runs/r/evaluate", 50000, sampler))
    assert evaluate.sampler == SamplerConfig(**sampler) and evaluate.num_samples == 50000
    assert evaluate.ref_stats == "" and evaluate.device == "auto"


@pytest.mark.parametrize("stage", ["encode", "evaluate"])
def test_jobs_are_placed_like_training_and_valid_against_the_crd(stage):
    settings = ClusterSettings()  # the pipeline's defaults: one 8-GPU node
    command = ["maskdit", stage, "out=\"s3://b/x\""]
    job = step_job(stage, command, settings, "run-1", "s3://b/runs/run-1/" + stage, {"MASKDIT_PARENT_RUN_ID": "p"})
    manifest = build_pytorchjob(job)
    assert manifest_errors(manifest, crd_validator()) == []
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == "8" and spec["runPolicy"]["backoffLimit"] == settings.backoff_limit
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    assert container["command"][-len(command):] == command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {e["name"] for e in container.get("env", [])} >= {"MASKDIT_PARENT_RUN_ID"}
    assert not any("SECRET" in e["name"] for e in container.get("env", []))  # credentials come through envFrom
    assert job.name.startswith(f"maskdit-{stage}-")


def test_job_plan_is_checked_and_none_means_in_process():
    assert job_plan(False, {}, 1.0) is None
    plan = job_plan(True, {"backend": "local", "local_nproc": 2}, 6.0)
    assert plan["cluster"]["local_nproc"] == 2 and plan["timeout_hours"] == 6.0
    with pytest.raises(ValueError, match="timeout_hours"):
        job_plan(True, {}, 0.0)
    with pytest.raises(ValueError, match="local_nprc"):
        job_plan(True, {"local_nprc": 2}, 1.0)


def test_an_evaluation_of_other_settings_never_reaches_the_gate():
    result = EvaluateResult(fid=3.0, num_samples=50000, sampler=SamplerConfig(), seed=0, checkpoint="c",
                            ref_stats="r", inception="bundled", world_size=8, seconds=1.0, grid="g")
    check_evaluation(result, 50000, SamplerConfig())
    with pytest.raises(EvalError, match=r"num_samples.*delete it and retry"):
        check_evaluation(result, 10000, SamplerConfig())
    with pytest.raises(EvalError, match="sampler"):
        check_evaluation(result, 50000, SamplerConfig(num_steps=18))

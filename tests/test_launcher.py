"""The PyTorchJob launcher against a stand-in API server (tests/fixtures/k8s_api.py) and locally."""

import sys

import pytest

from components.launcher import (
    CONTAINER,
    RUN_ID_LABEL,
    JobFailed,
    JobTimeout,
    LaunchError,
    TrainJob,
    build_pytorchjob,
    delete_run_jobs,
    job_name,
    label_value,
    last_line,
    launch,
    launch_local,
    training_client,
)
from fixtures.k8s_api import JobScript, crd_validator, manifest_errors

RUN_ID = "3f2c9a1e-7b4d-4c55-9d0e-1a2b3c4d5e6f"


def _job(**overrides) -> TrainJob:
    fields = dict(step="pretrain", run_id=RUN_ID, image="registry.example/maskdit:0.1.0",
                  command=["maskdit", "train", "--config", "imagenet256_pretrain.yaml", "run.out=s3://b/ckpt"],
                  checkpoint_uri="s3://b/ckpt", node_selector={"nvidia.com/gpu.present": "true"},
                  tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  secrets=["maskdit-s3", "maskdit-mlflow"], config_maps=["maskdit-config"], env={"MASKDIT_PARENT_RUN_ID": "abc"})
    fields.update(overrides)
    return TrainJob(**fields)


@pytest.fixture
def api(k8s_api):
    return training_client(namespace="default", configuration=k8s_api.configuration())


def _run(job, api, **kwargs):
    kwargs = {"timeout_s": 5.0, "poll_s": 0.05, **kwargs}
    return launch(job, "kubernetes", namespace="default", api=api, **kwargs)


# --- the manifest ---

@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 8), (2, 0)])
def test_manifest_is_valid_against_the_crd(nodes, gpus):
    manifest = build_pytorchjob(_job(nodes=nodes, gpus_per_node=gpus))
    assert manifest_errors(manifest, crd_validator()) == []
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == str(max(gpus, 1))
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0) == nodes - 1
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    (container,) = pod["spec"]["containers"]
    assert container["name"] == CONTAINER
    assert container["command"][:2] == ["torchrun", "--no-python"]
    assert container["command"][2:4] == ["maskdit", "train"]
    assert (container["resources"]["limits"].get("nvidia.com/gpu") == str(gpus)) if gpus else \
        "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["spec"]["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["envFrom"] == [{"configMapRef": {"name": "maskdit-config"}},
                                    {"secretRef": {"name": "maskdit-s3"}}, {"secretRef": {"name": "maskdit-mlflow"}}]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert manifest["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID
    assert manifest["metadata"]["annotations"]["maskdit/checkpoint-uri"] == "s3://b/ckpt"


def test_a_wrong_manifest_fails_validation():
    manifest = build_pytorchjob(_job())
    manifest["spec"]["nprocPerNode"] = 8  # an int where the CRD wants a string
    manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    errors = manifest_errors(manifest, crd_validator())
    assert any("nprocPerNode" in e for e in errors) and any("imagePullPolicyy" in e for e in errors)


def test_names_and_labels_are_valid_and_stable():
    name = job_name("pretrain", RUN_ID)
    assert name == job_name("pretrain", RUN_ID) != job_name("tune", RUN_ID) != job_name("pretrain", RUN_ID + "x")
    assert len(name) <= 50 and name.islower()
    assert label_value("run:with/odd chars_" + "x" * 80)[-1].isalnum() and len(label_value("a" * 99)) == 63


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="nodes=0"):
        _job(nodes=0)
    with pytest.raises(ValueError, match="backend='slurm'"):
        launch(_job(), "slurm")


# --- the Kubernetes path, through the real kubernetes client and Training SDK ---

def test_success_returns_the_master_log_and_streams_it(k8s_api, api, capsys):
    k8s_api.script(job_name("pretrain", RUN_ID),
                   JobScript(["Created", "Running", "Running", "Succeeded"], ["step 1", "step 2", "s3://b/ckpt/final.pt"]))
    log = _run(_job(), api)
    assert last_line(log) == "s3://b/ckpt/final.pt"
    printed = capsys.readouterr().out
    assert "created PyTorchJob default/" in printed and "succeeded" in printed
    assert "step 1" in printed  # streamed from the master pod
    posted = [p for m, p in k8s_api.requests if m == "POST"]
    assert posted == ["/apis/kubeflow.org/v1/namespaces/default/pytorchjobs"]


def test_failure_surfaces_reason_and_last_log_lines(k8s_api, api):
    k8s_api.script(job_name("pretrain", RUN_ID), JobScript(
        ["Created", "Running", "Failed"], [f"line {i}" for i in range(100)] + ["RuntimeError: CUDA out of memory"],
        reason="PyTorchJobFailed", message="PyTorchJob maskdit-pretrain is failed because 1 Master replica(s) failed."))
    with pytest.raises(JobFailed) as info:
        _run(_job(), api)
    text = str(info.value)
    assert "PyTorchJobFailed" in text and "1 Master replica(s) failed" in text
    assert "CUDA out of memory" in text and "line 99" in text and "line 10\n" not in text  # only the tail


def test_timeout_deletes_the_job(k8s_api, api):
    k8s_api.script(job_name("pretrain", RUN_ID), JobScript(["Created", "Running"], ["step 1"]))
    with pytest.raises(JobTimeout, match="did not finish within"):
        _run(_job(), api, timeout_s=0.5)
    assert k8s_api.jobs == {} and k8s_api.pods == {}
    assert ("DELETE", f"/apis/kubeflow.org/v1/namespaces/default/pytorchjobs/{job_name('pretrain', RUN_ID)}") \
        in k8s_api.requests


def test_a_retried_step_attaches_to_the_existing_job(k8s_api, api, capsys):
    k8s_api.add_job(build_pytorchjob(_job()))
    k8s_api.script(job_name("pretrain", RUN_ID), JobScript(["Created", "Running", "Succeeded"], ["resumed", "s3://b/ok"]))
    log = _run(_job(), api)
    assert last_line(log) == "s3://b/ok"
    assert "already exists (a retried step): attaching" in capsys.readouterr().out
    assert len(k8s_api.jobs) == 1


def test_an_invalid_manifest_is_rejected_by_the_api(k8s_api, api):
    with pytest.raises(LaunchError, match=r"could not create .*HTTP 422 Invalid: .*limits.cpu: 'lots'"):
        _run(_job(cpu="lots"), api)  # not a Kubernetes quantity
    assert k8s_api.jobs == {}


def test_cleanup_deletes_only_the_runs_jobs(k8s_api, api):
    for step in ("pretrain", "tune"):
        k8s_api.add_job(build_pytorchjob(_job(step=step)))
    k8s_api.add_job(build_pytorchjob(_job(run_id="another-run")))
    deleted = delete_run_jobs(RUN_ID, api, "default")
    assert sorted(deleted) == sorted([job_name("pretrain", RUN_ID), job_name("tune", RUN_ID)])
    assert [name for _, name in k8s_api.jobs] == [job_name("pretrain", "another-run")]
    assert delete_run_jobs(RUN_ID, api, "default") == []


# --- the local backend ---

def test_local_backend_runs_torchrun_and_returns_the_last_line(capsys):
    script = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE']); print('/tmp/final.pt')"
    job = _job(command=[sys.executable, "-c", script])
    log = launch_local(job, nproc=1, timeout_s=120)
    assert last_line(log) == "/tmp/final.pt"
    assert "rank 0 of 1" in capsys.readouterr().out


def test_local_backend_failure_and_timeout():
    with pytest.raises(JobFailed, match=r"(?s)exit code 1\).*boom"):
        launch_local(_job(command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]), timeout_s=120)
    with pytest.raises(JobTimeout):
        launch_local(_job(command=[sys.executable, "-c", "import time; time.sleep(60)"]), timeout_s=3)

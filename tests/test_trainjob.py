"""The Trainer v2 TrainJob against the Trainer v2.3.0 CRDs, and which job kind `job_api` picks.

The TrainJob the launcher builds and the ClusterTrainingRuntime in k8s/ validate against their CRD
schemas (tests/data/crds/trainer-v2.3.0, as the API server would check them); the pods they make
(the runtime's template with the TrainJob's trainer and patch, as the stand-in composes them) meet
the `restricted` Pod Security Standard. `auto` asks discovery: TrainJob when both are served,
PyTorchJob when only it is, a one-line error when neither is. Bad input fails in one line, with
nothing created.
"""

import copy

import pytest
import yaml
from fixtures.k8s_api import (
    PROJECT_RUNTIME,
    STOCK_RUNTIME,
    JobScript,
    K8sApiServer,
    as_the_cluster,
    crd_validator,
    manifest_errors,
    restricted_violations,
)

from components.cluster import ClusterSettings
from components.jobkind import KINDS, PYTORCHJOB, TRAINJOB, NoJobApi, resolve
from components.launch_base import POLL_ENV
from components.launcher import LaunchError, launch, training_client
from components.pytorchjob import QUEUE_LABEL, RUN_ID_LABEL, TrainJob, job_name
from components.trainer_v2 import KUEUE_PRIORITY_LABEL, TrainJobSpecError, build_trainjob
from maskdit.core.config import build_config

RUN_ID = "3f2c9a1e-7b4d-4c55-9d0e-1a2b3c4d5e6f"
NAME = job_name("pretrain", RUN_ID)
FAST = dict(timeout_s=20.0, poll_s=0.01, call_timeout_s=0.5, backoff_s=0.01, cleanup_s=5.0)


def _job(**overrides) -> TrainJob:
    fields = dict(step="pretrain", run_id=RUN_ID, image="registry.example/maskdit:0.1.0",
                  command=["maskdit", "train", "--config", "imagenet256_pretrain.yaml"], checkpoint_uri="s3://b/ckpt",
                  node_selector={"nvidia.com/gpu.present": "true"},
                  tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  secrets=["maskdit-s3", "maskdit-mlflow"], config_maps=["maskdit-config"],
                  env={"MASKDIT_PARENT_RUN_ID": "abc"})
    return TrainJob(**{**fields, **overrides})


@pytest.fixture
def server(request):
    """A stand-in API server serving the kinds given by indirect parametrisation (default: both)."""
    kinds = getattr(request, "param", ("trainjob", "pytorchjob"))
    api_server = K8sApiServer(kinds=kinds).start()
    yield api_server
    api_server.stop()


def _run(server, tmp_path, **kwargs):
    api = training_client(namespace="default", configuration=server.configuration())
    return launch(_job(checkpoint_uri=str(tmp_path / "ckpt")), "kubernetes", namespace="default", api=api,
                  **{**FAST, **kwargs})


# --- the manifests against the CRDs ---

@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 8), (2, 0)])
def test_the_trainjob_validates_against_the_crd(nodes, gpus):
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u", "controller": False,
             "blockOwnerDeletion": False}
    manifest = build_trainjob(_job(nodes=nodes, gpus_per_node=gpus, queue_name="team-a",
                                   priority_class_name="training-low"), owner=owner, deadline="2030-01-01T00:00:00Z")
    assert manifest_errors(manifest) == []
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "maskdit"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == max(gpus, 1)  # an int in v2.3
    assert trainer["command"][:5] == ["python", "-m", "maskdit.elastic", "--no-python", "maskdit"]
    assert trainer["resourcesPerNode"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert trainer["env"] == [{"name": "MASKDIT_PARENT_RUN_ID", "value": "abc"}]
    labels = manifest["metadata"]["labels"]
    assert labels[QUEUE_LABEL] == "team-a" and labels[KUEUE_PRIORITY_LABEL] == "training-low"
    assert labels[RUN_ID_LABEL] == RUN_ID and manifest["metadata"]["ownerReferences"] == [owner]
    (patch,) = spec["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]


def test_the_crd_check_rejects_mistakes():
    manifest = build_trainjob(_job())
    bad = copy.deepcopy(manifest)
    bad["spec"]["trainer"]["numProcPerNode"] = "auto"  # v2.3 takes an int
    bad["spec"]["trainer"]["imagePullPolicy"] = "Always"  # not a trainer field
    errors = manifest_errors(bad, crd_validator("TrainJob"))
    assert any("numProcPerNode" in e for e in errors) and any("imagePullPolicy" in e for e in errors)
    bad = copy.deepcopy(manifest)  # a patch may not touch the container's image or resources
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["containers"][0]["image"] = "other"
    assert any("image" in e for e in manifest_errors(bad))
    bad = copy.deepcopy(manifest)
    bad["metadata"]["name"] = "9-starts-with-a-digit"  # RFC 1035, the CRD's CEL rule
    assert any("RFC 1035" in e for e in manifest_errors(bad))


@pytest.mark.parametrize("path", [PROJECT_RUNTIME, STOCK_RUNTIME], ids=["maskdit", "torch-distributed"])
def test_the_runtimes_validate_against_the_crd(path):
    runtime = yaml.safe_load(path.read_text())
    assert manifest_errors(runtime) == []
    bad = copy.deepcopy(runtime)
    bad["spec"]["mlPolicy"]["mpi"] = {}  # a second ML policy: the CRD's CEL rule
    assert any("Only one of the policy" in e for e in manifest_errors(bad))


def test_the_runtime_maps_the_exit_codes_and_is_restricted():
    runtime = yaml.safe_load(PROJECT_RUNTIME.read_text())
    jobset = runtime["spec"]["template"]["spec"]
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    assert jobset["failurePolicy"]["maxRestarts"] == ClusterSettings().backoff_limit
    assert jobset["failurePolicy"]["rules"] == [{"name": "permanent", "action": "FailJobSet",
                                                 "onJobFailureReasons": ["PodFailurePolicy"]}]
    (node,) = jobset["replicatedJobs"]
    job = node["template"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    ignore, fail = job["podFailurePolicy"]["rules"]  # in order: a disruption first, then the exit code
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail == {"action": "FailJob",
                    "onExitCodes": {"containerName": "node", "operator": "NotIn", "values": [137, 143]}}
    pod = job["template"]["spec"]
    assert restricted_violations(pod) == [] and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["name"] == TRAINJOB.container
    assert container["envFrom"] == [{"configMapRef": {"name": "maskdit-config"}},
                                    {"secretRef": {"name": "maskdit-s3"}}, {"secretRef": {"name": "maskdit-mlflow"}}]


def test_the_trainjobs_pods_meet_the_restricted_standard(server):
    server.add_job(build_trainjob(_job(nodes=3, shm_size="8Gi")))
    assert len(server.pods) == 3
    for pod in server.pods.values():
        spec = pod["spec"]
        assert restricted_violations(spec) == [] and spec["automountServiceAccountToken"] is False
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in spec["volumes"]
        assert pod["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID


def test_what_a_trainjob_cannot_carry_is_refused_in_one_line():
    with pytest.raises(TrainJobSpecError, match=r"cannot add envFrom \['other-secret'\].*job_api=pytorchjob"):
        build_trainjob(_job(secrets=["maskdit-s3", "other-secret"]))
    with pytest.raises(TrainJobSpecError, match="priority_class_name='low' with a TrainJob needs Kueue"):
        build_trainjob(_job(priority_class_name="low"))


def test_a_backoff_limit_a_trainjob_cannot_carry_is_a_warning(server, tmp_path, capsys):
    """A TrainJob's restarts are its runtime's (failurePolicy.maxRestarts): a backoff_limit other than the default
    is said in one line, naming the setting and what Trainer v2 does instead; a PyTorchJob carries it."""
    api = training_client(namespace="default", configuration=server.configuration())
    for job_api in ("trainjob", "pytorchjob"):
        launch(_job(step=job_api, backoff_limit=5, checkpoint_uri=str(tmp_path / job_api)), "kubernetes",
               namespace="default", api=api, job_api=job_api, **FAST)
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warning.startswith("[launcher] warning: backoff_limit=5 does not apply to a TrainJob")
    assert "failurePolicy.maxRestarts (ClusterTrainingRuntime maskdit; 3 in " in warning
    assert "Kueue" in warning and "job_api=pytorchjob" in warning
    assert server.jobs[("default", job_name("pytorchjob", RUN_ID))]["spec"]["runPolicy"]["backoffLimit"] == 5
    assert TRAINJOB.ignored(_job()) == [] and PYTORCHJOB.ignored(_job(backoff_limit=5)) == []


# --- which kind: job_api and discovery ---

@pytest.mark.parametrize("server,job_api,expected", [
    (("trainjob", "pytorchjob"), "auto", "TrainJob"),
    (("pytorchjob",), "auto", "PyTorchJob"),
    (("trainjob",), "auto", "TrainJob"),
    (("trainjob", "pytorchjob"), "pytorchjob", "PyTorchJob"),
    (("trainjob", "pytorchjob"), "trainjob", "TrainJob"),
], indirect=["server"])
def test_auto_asks_discovery(server, tmp_path, capsys, job_api, expected):
    _run(server, tmp_path, job_api=job_api)
    assert [job["kind"] for job in server.jobs.values()] == [expected]
    assert f"as a {expected} " in capsys.readouterr().out


@pytest.mark.parametrize("server", [()], indirect=True)
def test_a_cluster_with_neither_crd_is_one_line(server, tmp_path):
    with pytest.raises(NoJobApi) as info:
        _run(server, tmp_path)
    text = str(info.value)
    assert "\n" not in text and "trainjobs.trainer.kubeflow.org" in text and "pytorchjobs.kubeflow.org" in text
    assert "install one" in text and not any(m == "POST" for m, _ in server.requests)


@pytest.mark.parametrize("server", [("pytorchjob",)], indirect=True)
def test_asking_for_a_kind_the_cluster_lacks_names_both(server, tmp_path):
    with pytest.raises(NoJobApi, match=r"job_api=trainjob, but the cluster does not serve trainjobs\..*"
                                       r"job_api=pytorchjob if the cluster has Kubeflow Training Operator v1.9"):
        _run(server, tmp_path, job_api="trainjob")
    assert server.jobs == {}


def test_an_unknown_job_api_is_refused(server, tmp_path):
    with pytest.raises(NoJobApi, match=r"job_api='slurm' is not known: use one of auto, trainjob, pytorchjob"):
        _run(server, tmp_path, job_api="slurm")
    with pytest.raises(ValueError, match="job_api"):
        build_config(ClusterSettings, {"job_api": "slurm"}, source="the pipeline's parameters")
    assert resolve("auto", lambda kind: kind is PYTORCHJOB) is PYTORCHJOB and list(KINDS) == ["trainjob", "pytorchjob"]


def test_a_runtime_that_does_not_exist_is_one_line(server, tmp_path):
    with pytest.raises(LaunchError) as info:
        _run(server, tmp_path, runtime="maskdit-typo")
    text = str(info.value)
    assert "\n" not in text and "denied the request" in text and "maskdit-typo" in text
    assert "install the runtime" in text and "set the `runtime` parameter" in text
    assert server.jobs == {} and server.pods == {}


# --- the training step end to end: its job runs `maskdit train` for real (the stand-in as kubelet) ---

TINY = ["steps=2", "checkpoint.every=2", "batch.global_batch=8", "log_every=1", "monitor.grid_every=0",
        "monitor.fid_samples=0"]


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory) -> str:
    """30 MNIST digits at 32x32 in pixel space (no VAE), encoded as the encode step would."""
    from maskdit.data.encode import EncodeConfig, run
    from maskdit.data.mnist import write_mnist

    root = tmp_path_factory.mktemp("digits")
    write_mnist(str(root / "mnist"), 30)
    return run(EncodeConfig(input=str(root / "mnist"), out=str(root / "dataset"), resolution=32, pixel_space=True,
                            grayscale=True, device="cpu")).dataset


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("job_api", ["trainjob", "pytorchjob"])
def test_the_training_step_runs_as_either_kind(job_api, digits_dataset, tmp_path, monkeypatch):
    """The pretrain step's own code (components/steps.train_step) against a cluster that serves both
    kinds, with job_api forced: the job is created, its master runs torchrun + `maskdit train` (the
    stand-in runs the pod's command as a kubelet would), the step reads the job's result.json and
    saves its log - the same checks for both kinds."""
    from components.steps import TrainStep, train_step

    monkeypatch.setenv(POLL_ENV, "0.2")  # not the pod's 15 s
    server = K8sApiServer(kinds=("trainjob", "pytorchjob"), run_pods=True).start()
    try:
        server.default_script = JobScript(log_lines=[], worker_lines=[])
        as_the_cluster(server, tmp_path / "kubeconfig", monkeypatch)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cluster = ClusterSettings(job_api=job_api, namespace="default", gpus_per_node=0, cpu_request="1",
                                  cpu_limit="", memory_request="1Gi", memory_limit="4Gi", shm_size="1Gi")
        step = TrainStep(stage="pretrain", config="mnist_pretrain", overrides=TINY, dataset=digits_dataset,
                         store_uri=str(tmp_path / "store"), kfp_run_id=f"run-{job_api}", experiment="e",
                         timeout_hours=0.05, cluster=cluster)
        result, _, logs = train_step(step)
    finally:
        server.stop()
    (job,) = server.jobs.values()
    assert job["kind"] == {"trainjob": "TrainJob", "pytorchjob": "PyTorchJob"}[job_api]
    assert job["metadata"]["labels"][RUN_ID_LABEL] == f"run-{job_api}"
    assert result.step == 2 and result.checkpoint and result.checkpoint.startswith(step.checkpoint_dir)
    (log,) = logs.values()
    text = open(log).read()
    assert "step" in text and str(result.step) in text

"""The launcher against a stand-in API server (tests/fixtures/k8s_api.py) on a bad day, and locally.

Every Kubernetes test runs for both job kinds (the `kind` fixture): a Trainer v2 TrainJob and a
Training Operator PyTorchJob, each on a cluster that serves only that kind (so `job_api=auto` finds it).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fixtures.k8s_api import (
    UNSCHEDULABLE,
    Fault,
    JobScript,
    K8sApiServer,
    crd_validator,
    manifest_errors,
    restricted_violations,
)

from components.jobkind import KINDS, TRAINJOB
from components.kube_calls import is_transient
from components.kube_logs import stamp_ns
from components.launch_base import POLL_ENV, poll_interval
from components.launcher import (
    DeadlinePassed,
    JobFailed,
    JobPending,
    JobTimeout,
    LaunchError,
    LaunchResult,
    StepEvicted,
    StepTerminated,
    deadline_marker,
    delete_run_jobs,
    launch,
    launch_local,
    training_client,
)
from components.pytorchjob import (
    CONTAINER,
    DEADLINE_ANNOTATION,
    QUEUE_LABEL,
    RUN_ID_LABEL,
    TrainJob,
    build_pytorchjob,
    job_name,
    label_value,
)
from maskdit.core.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "3f2c9a1e-7b4d-4c55-9d0e-1a2b3c4d5e6f"
NAME = job_name("pretrain", RUN_ID)
FAST = dict(timeout_s=20.0, poll_s=0.01, call_timeout_s=0.5, backoff_s=0.01, cleanup_s=10.0)


def _job(checkpoint_uri="s3://b/ckpt", **overrides) -> TrainJob:
    fields = dict(step="pretrain", run_id=RUN_ID, image="registry.example/maskdit:0.1.0",
                  command=["maskdit", "train", "--config", "imagenet256_pretrain.yaml", "run.out=s3://b/ckpt"],
                  checkpoint_uri=str(checkpoint_uri), node_selector={"nvidia.com/gpu.present": "true"},
                  tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  secrets=["maskdit-s3", "maskdit-mlflow"], config_maps=["maskdit-config"], env={"MASKDIT_PARENT_RUN_ID": "abc"})
    fields.update(overrides)
    return TrainJob(**fields)


@pytest.fixture(params=list(KINDS))
def kind(request):
    """Each job kind in turn (components/jobkind.py)."""
    return KINDS[request.param]


@pytest.fixture
def k8s_api(kind):
    """A stand-in API server that serves only `kind`'s API (and, for TrainJobs, the project's runtime)."""
    server = K8sApiServer(kinds=(kind.key,)).start()
    yield server
    server.stop()


@pytest.fixture
def api(k8s_api):
    return training_client(namespace="default", configuration=k8s_api.configuration())


@pytest.fixture
def ckpt(tmp_path):
    return tmp_path / "ckpt"


def _run(job, api, **kwargs) -> LaunchResult:
    return launch(job, "kubernetes", namespace="default", api=api, **{**FAST, **kwargs})


def _saved(ckpt: Path, pod: str) -> list[str]:
    return (ckpt / "logs" / f"{pod}.log").read_text().splitlines()


def _pod(kind, rank: int) -> str:
    """A pod's name (a glob for TrainJob pods, whose names end in a random suffix), by node rank."""
    if kind is TRAINJOB:
        return f"{NAME}-node-0-{rank}-*"
    return f"{NAME}-master-0" if rank == 0 else f"{NAME}-worker-{rank - 1}"


def _log(ckpt: Path, kind, rank: int = 0) -> Path:
    """The saved log of the job's pod of node rank `rank`."""
    (path,) = (ckpt / "logs").glob(f"{_pod(kind, rank)}.log")
    return path


def _job_path(kind) -> str:
    return f"/apis/{kind.group}/{kind.version}/namespaces/default/{kind.plural}/{NAME}"


def _printed(text: str, pod: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in text.splitlines() if line.startswith(f"[{pod}] ")]


def _posts(k8s_api) -> int:
    return sum(1 for m, p in k8s_api.requests if m == "POST")


def test_the_poll_interval_comes_from_the_environment(monkeypatch):
    """$MASKDIT_LAUNCH_POLL_S sets how often the launcher looks at a running job (15 s unset); a value that is not a
    number of seconds > 0 is one line naming it."""
    monkeypatch.delenv(POLL_ENV, raising=False)
    assert poll_interval() == 15.0
    monkeypatch.setenv(POLL_ENV, "0.5")
    assert poll_interval() == 0.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(POLL_ENV, bad)
        with pytest.raises(UsageError, match=rf"MASKDIT_LAUNCH_POLL_S='{bad}' is not a number of seconds > 0"):
            poll_interval()


# --- the manifest ---

@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 8), (2, 0)])
def test_manifest_is_valid_against_the_crd(nodes, gpus):
    manifest = build_pytorchjob(_job(nodes=nodes, gpus_per_node=gpus))
    assert manifest_errors(manifest, crd_validator()) == []
    spec = manifest["spec"]
    assert spec["nprocPerNode"] == str(max(gpus, 1))
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0) == nodes - 1
    for replica in spec["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    (container,) = pod["spec"]["containers"]
    assert container["name"] == CONTAINER
    assert container["command"][:5] == ["python", "-m", "maskdit.elastic", "--no-python", "maskdit"]
    resources = container["resources"]
    assert resources["requests"]["cpu"] == "80" and resources["limits"]["cpu"] == "90"
    assert resources["requests"]["memory"] == "480Gi" and resources["limits"]["memory"] == "580Gi"
    assert (resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu") == str(gpus)) \
        if gpus else "nvidia.com/gpu" not in resources["limits"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["spec"]["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["envFrom"] == [{"configMapRef": {"name": "maskdit-config"}},
                                    {"secretRef": {"name": "maskdit-s3"}}, {"secretRef": {"name": "maskdit-mlflow"}}]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "priorityClassName" not in pod["spec"] and QUEUE_LABEL not in manifest["metadata"]["labels"]
    assert manifest["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID
    assert manifest["metadata"]["annotations"]["maskdit/checkpoint-uri"] == "s3://b/ckpt"
    assert "ownerReferences" not in manifest["metadata"]


def test_manifest_options_for_shared_clusters():
    manifest = build_pytorchjob(_job(nodes=2, queue_name="team-a", priority_class_name="training-low", backoff_limit=7,
                                     cpu_limit="", cpu_request="8", memory_request="64Gi", memory_limit="80Gi"),
                                deadline="2030-01-01T00:00:00Z")
    assert manifest_errors(manifest, crd_validator()) == []
    assert manifest["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert manifest["metadata"]["annotations"][DEADLINE_ANNOTATION] == "2030-01-01T00:00:00Z"
    assert manifest["spec"]["runPolicy"]["backoffLimit"] == 7
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["priorityClassName"] == "training-low"
        resources = pod["containers"][0]["resources"]
        assert resources["requests"]["cpu"] == "8" and "cpu" not in resources["limits"]
        assert resources["requests"]["memory"] == "64Gi" and resources["limits"]["memory"] == "80Gi"


def test_the_grace_period_setting_sets_the_pods_and_trainings_together():
    """Issue 23.7: the jobs kept Kubernetes' 30 s while an XL/2 checkpoint takes minutes. The one setting gives the
    pods terminationGracePeriodSeconds above training's own grace period (SIGKILL only after it), and the pipeline's
    training command gets the same number (components/steps.py)."""
    from components.cluster import ClusterSettings
    from components.pytorchjob import EXIT_MARGIN_S

    for grace in (ClusterSettings().grace_period_s, 600.0, 12.5):
        job = TrainJob.from_settings(ClusterSettings(grace_period_s=grace), step="pretrain", run_id=RUN_ID,
                                     command=["maskdit", "train"], checkpoint_uri="s3://b/ckpt")
        manifest = build_pytorchjob(_job(nodes=2, grace_period_s=job.grace_period_s), deadline="2030-01-01T00:00:00Z")
        assert manifest_errors(manifest, crd_validator()) == []
        for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
            seconds = replica["template"]["spec"]["terminationGracePeriodSeconds"]
            assert isinstance(seconds, int) and grace + EXIT_MARGIN_S <= seconds < grace + EXIT_MARGIN_S + 1
    assert ClusterSettings().grace_period_s >= 120, "an XL/2 checkpoint takes minutes"
    with pytest.raises(ValueError, match="grace_period_s=0"):
        _job(grace_period_s=0)
    source = (ROOT / "components" / "steps.py").read_text()
    assert 'f"checkpoint.grace_period_s={step.cluster.grace_period_s:g}"' in source


def test_the_job_meets_the_restricted_pod_security_standard():
    manifest = build_pytorchjob(_job(nodes=3))
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 10001
    static = yaml.safe_load((Path(__file__).parents[1] / "k8s/components/training-operator/pytorchjob.yaml").read_text())
    assert restricted_violations(static["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]) == []
    # the checker itself catches what the profile forbids
    pod = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    pod["securityContext"] = {"runAsUser": 0}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"]},
                                               "appArmorProfile": {"type": "Unconfined"}}
    found = "\n".join(restricted_violations(pod))
    for rule in ("runAsUser: must not be 0", "hostPath", "allowPrivilegeEscalation", "runAsNonRoot must be true",
                 "seccompProfile.type must be", "drop: must include ALL", "only NET_BIND_SERVICE",
                 "appArmorProfile.type: must not be Unconfined"):
        assert rule in found


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
    with pytest.raises(ValueError, match="backoff_limit=-1"):
        _job(backoff_limit=-1)
    with pytest.raises(ValueError, match="backend='slurm'"):
        launch(_job(), "slurm")


def test_transient_and_permanent_errors():
    import urllib3
    from kubernetes.client.exceptions import ApiException

    def wrapped(error):  # as the Training SDK wraps an ApiException: `raise RuntimeError(...)` in `except`
        try:
            try:
                raise error
            except Exception as e:
                raise RuntimeError(f"Failed: {e}")  # noqa: B904 - the SDK's way
        except RuntimeError as outer:
            return outer

    assert is_transient(TimeoutError("Timeout to get PyTorchJob: default/x"))  # the SDK's slow get_job
    assert is_transient(urllib3.exceptions.ReadTimeoutError(None, "/x", "Read timed out."))
    assert is_transient(urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    assert is_transient(wrapped(ApiException(status=503))) and is_transient(ApiException(status=429))
    for status in (400, 403, 404, 409, 422):
        assert not is_transient(wrapped(ApiException(status=status)))
    assert stamp_ns("2026-01-02T03:04:05.5Z") == stamp_ns("2026-01-02T04:04:05.500000000+01:00") \
        == stamp_ns("2026-01-02T03:04:05Z") + 500_000_000


# --- the Kubernetes path, through the real kubernetes client ---

def test_success_saves_every_replicas_log_and_returns_where(k8s_api, api, ckpt, capsys, kind):
    lines = [f"step {i}" for i in range(20)]
    k8s_api.script(NAME, JobScript(["Created", "Running", "Running", "Succeeded"], lines,
                                   worker_lines=["worker says hi"]))
    result = _run(_job(ckpt, nodes=2), api)
    master, worker = _log(ckpt, kind, 0).stem, _log(ckpt, kind, 1).stem
    assert result.job == NAME and result.namespace == "default"
    assert result.tail.splitlines() == lines
    assert set(result.log_uris) == {master, worker}
    assert Path(result.log_uris[master]) == ckpt / "logs" / f"{master}.log"
    assert _saved(ckpt, master) == lines and _saved(ckpt, worker) == ["worker says hi"]
    printed = capsys.readouterr().out
    assert f"created {kind.kind} default/" in printed and "succeeded" in printed
    assert _printed(printed, master) == lines  # streamed from the master pod as it ran
    assert _posts(k8s_api) == 1


def test_failure_surfaces_reason_and_last_log_lines(k8s_api, api, ckpt, kind):
    k8s_api.script(NAME, JobScript(
        ["Created", "Running", "Failed"], [f"line {i}" for i in range(100)] + ["RuntimeError: CUDA out of memory"],
        reason="PyTorchJobFailed", message="PyTorchJob maskdit-pretrain is failed because 1 Master replica(s) failed."))
    with pytest.raises(JobFailed) as info:
        _run(_job(ckpt), api)
    text = str(info.value)
    assert "PyTorchJobFailed" in text and "1 Master replica(s) failed" in text
    assert "CUDA out of memory" in text and "line 99" in text and "line 10\n" not in text  # only the tail
    assert f"logs/{_log(ckpt, kind).name}" in text and len(_log(ckpt, kind).read_text().splitlines()) == 101
    assert k8s_api.jobs  # a failed job is kept for inspection (the run's cleanup removes it)


def test_a_flapping_api_is_ridden_out(k8s_api, api, ckpt, capsys, kind):
    lines = [f"step {i}" for i in range(30)]
    k8s_api.script(NAME, JobScript(["Created", "Running", "Running", "Running", "Succeeded"], lines))
    others = r"^(?!.*/(pytorchjobs|trainjobs)$)"  # all but the create: its lost answer below must happen
    k8s_api.inject(Fault(path=others, every=3, status=500),  # every third request: etcd leader change
                   Fault(path=others, every=4, status=429, times=1),  # Retry-After: 1
                   Fault(method="GET", path="/pods$", every=5, drop="before"),  # connection reset
                   Fault(method="POST", drop="after", times=1))  # created, but the answer is lost
    result = _run(_job(ckpt), api)
    assert result.tail.splitlines() == lines and _log(ckpt, kind).read_text().splitlines() == lines
    printed = capsys.readouterr().out
    assert "HTTP 500 InternalError" in printed and "HTTP 429 TooManyRequests" in printed and "retrying in" in printed
    assert "already exists (a retried step): attaching" in printed  # the lost answer: 409 on the retry
    assert list(k8s_api.jobs) == [("default", NAME)]


def test_a_call_slower_than_its_timeout_is_retried(k8s_api, api, ckpt, capsys, kind):
    k8s_api.inject(Fault(method="GET", path=f"{kind.plural}/", delay_s=1.5, times=2))
    result = _run(_job(ckpt), api, call_timeout_s=0.3)
    assert result.tail.splitlines() == ["step 1 loss 1.0", "step 2 loss 0.5"]
    assert "ReadTimeoutError" in capsys.readouterr().out


def test_a_permanent_error_fails_at_once(k8s_api, api, ckpt):
    k8s_api.inject(Fault(method="POST", status=403))
    with pytest.raises(LaunchError, match=r"refused .*HTTP 403 Forbidden: .*cannot do this.*bind the Role"):
        _run(_job(ckpt), api)
    assert _posts(k8s_api) == 1


def test_a_permanent_error_while_waiting_fails_with_the_servers_words(k8s_api, api, ckpt, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))
    k8s_api.inject(Fault(method="GET", path="/pods$", every=3, status=403))  # e.g. the Role lost 'list pods'
    with pytest.raises(LaunchError, match=rf"lost track of {kind.kind} default/.*HTTP 403 Forbidden"):
        _run(_job(ckpt), api)


def test_a_job_deleted_by_someone_else_is_reported(k8s_api, api, ckpt):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))
    threading.Timer(0.5, k8s_api.remove_job, (NAME,)).start()
    with pytest.raises(JobFailed, match="was deleted while this step waited for it"):
        _run(_job(ckpt), api)


def test_an_invalid_manifest_is_rejected_by_the_api(k8s_api, api, ckpt):
    with pytest.raises(LaunchError, match=r"refused .*HTTP 422 Invalid: .*requests.cpu: 'lots'.*nothing was created") \
            as info:
        _run(_job(ckpt, cpu_request="lots"), api)  # not a Kubernetes quantity
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert k8s_api.jobs == {} and _posts(k8s_api) == 1


def test_a_log_stream_that_disconnects_loses_and_repeats_nothing(k8s_api, api, ckpt, capsys, kind):
    lines = [f"step {i} loss {i / 10}" for i in range(12)] + ["step 11 loss 1.1", "step 11 loss 1.1"]  # repeats are real
    k8s_api.script(NAME, JobScript(["Created", "Running", "Running", "Succeeded"], lines, lines_at={2: ["done"]}))
    k8s_api.inject(Fault(path="/log$", cut_after=3, times=3))  # each cut mid-line, in the same second
    _run(_job(ckpt), api)
    master = _log(ckpt, kind).stem
    assert _saved(ckpt, master) == lines + ["done"]
    assert _printed(capsys.readouterr().out, master) == lines + ["done"]
    assert sum(1 for m, p in k8s_api.requests if p.endswith("/log")) >= 4


@pytest.mark.parametrize("gate", [True, False], ids=["mid-stream", "while-away"])
def test_the_master_restarted_keeps_its_whole_log(k8s_api, api, ckpt, capsys, gate, kind):
    first, second, third = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)], ["c0", "c1"]
    k8s_api.script(NAME, JobScript(["Created", "Running", "Restart", "Running", "Succeeded"], first,
                                   lines_at={2: second, 3: third}, follow_gate=gate))
    result = _run(_job(ckpt), api)
    master = _log(ckpt, kind).stem
    assert _saved(ckpt, master) == first + second + third
    printed = capsys.readouterr().out
    assert _printed(printed, master) == first + second + third
    assert k8s_api.pods[("default", master)]["status"]["containerStatuses"][0]["restartCount"] == 1
    assert result.tail.splitlines()[-2:] == third


def test_a_recreated_master_pod_is_followed(k8s_api, api, ckpt, capsys, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running", "Recreate", "Running", "Succeeded"], ["old 0", "old 1"],
                                   lines_at={2: ["new 0"], 3: ["new 1"]}))
    _run(_job(ckpt), api)
    assert _log(ckpt, kind).read_text().splitlines() == ["old 0", "old 1", "new 0", "new 1"]
    assert "was re-created: following the new one" in capsys.readouterr().out


def test_lines_streamed_just_before_the_master_is_re_created_are_kept(k8s_api, api, ckpt, kind):
    # Every pod list answers late: the old master's lines are on the follower's open stream, the job moves on
    # and re-creates the master before the follower's check of whose log it opened comes back.
    k8s_api.inject(Fault(method="GET", path=r"/pods$", delay_s=0.15))
    k8s_api.script(NAME, JobScript(["Created", "Running", "Recreate", "Running", "Succeeded"], ["old 0", "old 1"],
                                   lines_at={2: ["new 0"], 3: ["new 1"]}))
    _run(_job(ckpt), api)
    assert _log(ckpt, kind).read_text().splitlines() == ["old 0", "old 1", "new 0", "new 1"]


def test_a_log_opened_just_after_the_master_is_re_created_is_read_once(k8s_api, api, ckpt, kind):
    # The follower sees the old master running (silent, so the job moves on), its log call answers late: by
    # then the master was re-created, and (PyTorchJob: same pod name) the stream opened is the new pod's.
    k8s_api.inject(Fault(method="GET", path=r"/log$", delay_s=0.8, times=1))
    k8s_api.script(NAME, JobScript(["Created", *["Running"] * 3, "Recreate", "Running", "Succeeded"], [],
                                   lines_at={4: ["new 0"], 5: ["new 1"]}))
    _run(_job(ckpt), api, call_timeout_s=2.0)
    assert _log(ckpt, kind).read_text().splitlines() == ["new 0", "new 1"]


def test_an_unschedulable_job_fails_with_the_schedulers_reason(k8s_api, api, ckpt):
    k8s_api.script(NAME, JobScript(["Created", "Unschedulable"]))
    with pytest.raises(JobPending) as info:
        _run(_job(ckpt, nodes=2), api, pending_timeout_s=0.3)
    text = str(info.value)
    assert f"pod {NAME}-" in text and "Pending for more than 0s" in text and UNSCHEDULABLE in text
    assert "Insufficient nvidia.com/gpu" in text and "deleted it" in text
    assert k8s_api.jobs == {}, text


@pytest.mark.parametrize("incident,reason", [("OOMKilled", "OOMKilled"), ("Evicted", "Evicted")])
def test_an_oom_killed_or_evicted_worker_is_named(k8s_api, api, ckpt, incident, reason, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running", incident, "Failed"], ["step 1"], reason="PyTorchJobFailed",
                                   message="1 Worker replica(s) failed", follow_gate=False))
    with pytest.raises(JobFailed) as info:
        _run(_job(ckpt, nodes=2), api)
    text = str(info.value)
    worker = _log(ckpt, kind, 1)
    assert f"pod {worker.stem}: " in text and reason in text and "1 Worker replica(s) failed" in text
    assert worker.read_text() == "worker ready\n"


def test_the_deadline_deletes_the_job_and_says_so(k8s_api, api, ckpt, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))
    with pytest.raises(JobTimeout, match="did not finish by the step's deadline") as info:
        _run(_job(ckpt), api, timeout_s=0.5)
    assert "deleted it" in str(info.value) and "could NOT" not in str(info.value)
    assert k8s_api.jobs == {} and k8s_api.pods == {}
    assert ("DELETE", _job_path(kind)) in k8s_api.requests
    assert _log(ckpt, kind).read_text().splitlines() == ["step 1"]  # saved before the pods went away
    marker = json.loads(Path(deadline_marker(_job(ckpt))).read_text())
    assert marker["job"] == NAME and marker["passed_at"]


def test_a_retry_after_the_deadline_does_not_start_the_job_again(k8s_api, api, ckpt):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))
    with pytest.raises(JobTimeout):
        _run(_job(ckpt), api, timeout_s=0.5)
    posts = _posts(k8s_api)
    with pytest.raises(DeadlinePassed, match=r"reached its deadline .* not starting it again") as info:
        _run(_job(ckpt), api, timeout_s=3600)  # the step's retry, with its full timeout again
    assert str(deadline_marker(_job(ckpt))) in str(info.value)
    assert _posts(k8s_api) == posts and k8s_api.jobs == {}


def test_a_retry_keeps_the_first_tries_deadline(k8s_api, api, ckpt, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))
    job = _job(ckpt)
    Path(deadline_marker(job)).parent.mkdir(parents=True)
    Path(deadline_marker(job)).write_text(json.dumps({"job": NAME, "namespace": "default", "timeout_s": 60.0,
                                                      "deadline": "2020-01-01T00:00:00Z", "passed_at": None}))
    k8s_api.add_job(kind.manifest(job))  # the first try's job, still running
    with pytest.raises(JobTimeout, match="2020-01-01T00:00:00Z"):
        _run(job, api, timeout_s=3600)
    assert k8s_api.jobs == {} and _posts(k8s_api) == 0


def test_sigterm_to_the_step_deletes_the_job(k8s_api, api, ckpt, kind):
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))

    def ignore(signum, frame):  # without the launcher's own handler SIGTERM changes nothing: the test times out
        pass

    previous = signal.signal(signal.SIGTERM, ignore)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # KFP Terminate: Argo stops the step
        with pytest.raises(StepTerminated, match=f"got SIGTERM .* deleted {kind.kind}") as info:
            _run(_job(ckpt), api, timeout_s=5.0)
        assert signal.getsignal(signal.SIGTERM) is ignore  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "could NOT" not in str(info.value)
    assert k8s_api.jobs == {} and ("DELETE", _job_path(kind)) in k8s_api.requests
    assert _log(ckpt, kind).read_text().splitlines() == ["step 1"]
    assert json.loads(Path(deadline_marker(_job(ckpt))).read_text())["passed_at"] is None  # a retry may start it


STEP_POD = {"name": "run-abc-pretrain-launcher", "uid": "0b5e6a1c-1111-2222-3333-444455556666"}


def _sigterm_to_the_step(k8s_api, api, ckpt, monkeypatch, conditions: list[dict]):
    """The step in its pod (downward-API env), whose pod has `conditions` when SIGTERM comes; the raised error."""
    monkeypatch.setenv("MASKDIT_POD_NAME", STEP_POD["name"])
    monkeypatch.setenv("MASKDIT_POD_UID", STEP_POD["uid"])
    monkeypatch.setenv("MASKDIT_POD_NAMESPACE", "default")
    k8s_api.add_pod({"metadata": {"name": STEP_POD["name"], "uid": STEP_POD["uid"], "labels": {}},
                     "status": {"phase": "Running", "conditions": conditions}})
    k8s_api.script(NAME, JobScript(["Created", "Running"], ["step 1"]))  # stays Running
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(StepTerminated) as info:
            _run(_job(ckpt), api, timeout_s=5.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return info.value


def test_a_drain_that_evicts_the_step_pod_leaves_the_job_running(k8s_api, api, ckpt, monkeypatch, kind):
    """Issue 23.8: `kubectl drain` evicting the 1-CPU step pod deleted the 8-GPU job. The Eviction API marks the
    pod (DisruptionTarget) before SIGTERM: the launcher leaves the job, takes its pod off the job's owners (the
    garbage collector would delete the job with the pod) and fails the step for KFP to retry; the retry attaches."""
    error = _sigterm_to_the_step(k8s_api, api, ckpt, monkeypatch, [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
         "message": "Eviction API: evicting"}, {"type": "Ready", "status": "True"}])
    assert isinstance(error, StepEvicted) and "EvictionByEvictionAPI" in str(error) and f"left {kind.kind}" in str(error)
    assert "could NOT" not in str(error)
    assert ("DELETE", _job_path(kind)) not in k8s_api.requests and ("default", NAME) in k8s_api.jobs
    assert not k8s_api.jobs[("default", NAME)]["metadata"].get("ownerReferences"), "the evicted pod still owns it"
    monkeypatch.setenv("MASKDIT_POD_NAME", "run-abc-pretrain-launcher-retry")  # KFP's retry: a new pod
    monkeypatch.setenv("MASKDIT_POD_UID", "uid-retry")
    k8s_api.script(NAME, JobScript(["Created", "Running", "Succeeded"], ["step 1"]))  # training went on: it ends
    assert _run(_job(ckpt), api).job == NAME
    owners = k8s_api.jobs[("default", NAME)]["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == ["uid-retry"]


@pytest.mark.parametrize("conditions", [[], [{"type": "DisruptionTarget", "status": "False"}]], ids=["none", "false"])
def test_kfp_terminate_still_deletes_the_job(k8s_api, api, ckpt, monkeypatch, conditions, kind):
    """KFP's Terminate deletes the step pod through the API, which sets no DisruptionTarget: the job goes."""
    error = _sigterm_to_the_step(k8s_api, api, ckpt, monkeypatch, conditions)
    assert not isinstance(error, StepEvicted) and f"deleted {kind.kind}" in str(error)
    assert k8s_api.jobs == {} and ("DELETE", _job_path(kind)) in k8s_api.requests


def test_a_retried_step_attaches_to_the_existing_job(k8s_api, api, ckpt, capsys, kind):
    k8s_api.add_job(kind.manifest(_job(ckpt)))
    k8s_api.script(NAME, JobScript(["Created", "Running", "Succeeded"], ["resumed", "s3://b/ok"]))
    result = _run(_job(ckpt), api)
    assert result.tail.splitlines() == ["resumed", "s3://b/ok"]
    assert "already exists (a retried step): attaching" in capsys.readouterr().out
    assert len(k8s_api.jobs) == 1


def test_the_job_is_owned_by_the_step_pod(k8s_api, api, ckpt, monkeypatch):
    monkeypatch.setenv("MASKDIT_POD_NAME", "run-abc-pretrain-launcher")
    monkeypatch.setenv("MASKDIT_POD_UID", "0b5e6a1c-1111-2222-3333-444455556666")
    monkeypatch.setenv("MASKDIT_POD_NAMESPACE", "default")
    _run(_job(ckpt), api)
    assert k8s_api.jobs[("default", NAME)]["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "run-abc-pretrain-launcher",
        "uid": "0b5e6a1c-1111-2222-3333-444455556666", "controller": False, "blockOwnerDeletion": False}]


def test_a_retried_step_adds_its_pod_as_an_owner(k8s_api, api, ckpt, monkeypatch, kind):
    first = {"apiVersion": "v1", "kind": "Pod", "name": "try-1", "uid": "uid-1", "controller": False,
             "blockOwnerDeletion": False}
    k8s_api.add_job(kind.manifest(_job(ckpt), owner=first))
    monkeypatch.setenv("MASKDIT_POD_NAME", "try-2")
    monkeypatch.setenv("MASKDIT_POD_UID", "uid-2")
    monkeypatch.setenv("MASKDIT_POD_NAMESPACE", "default")
    k8s_api.inject(Fault(method="PATCH", status=409, times=1))  # someone else wrote the job meanwhile
    _run(_job(ckpt), api)
    owners = k8s_api.jobs[("default", NAME)]["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == ["uid-1", "uid-2"]  # GC deletes the job only once both pods are gone


def test_no_owner_outside_a_pod_or_across_namespaces(k8s_api, api, ckpt, monkeypatch, capsys):
    for key in ("MASKDIT_POD_NAME", "MASKDIT_POD_UID", "MASKDIT_POD_NAMESPACE"):
        monkeypatch.delenv(key, raising=False)
    _run(_job(ckpt), api)
    assert "ownerReferences" not in k8s_api.jobs[("default", NAME)]["metadata"]
    k8s_api.jobs.clear()
    monkeypatch.setenv("MASKDIT_POD_NAME", "p")
    monkeypatch.setenv("MASKDIT_POD_UID", "u")
    monkeypatch.setenv("MASKDIT_POD_NAMESPACE", "kubeflow")  # GC would treat it as absent and delete the job
    _run(_job(ckpt), api)
    assert "ownerReferences" not in k8s_api.jobs[("default", NAME)]["metadata"]
    assert "not setting an ownerReference" in capsys.readouterr().out


def test_cleanup_deletes_only_the_runs_jobs(k8s_api, api, kind):
    for step in ("pretrain", "tune"):
        k8s_api.add_job(kind.manifest(_job(step=step)))
    k8s_api.add_job(kind.manifest(_job(run_id="another-run")))
    k8s_api.inject(Fault(method="DELETE", every=2, status=503))
    deleted = delete_run_jobs(RUN_ID, api, "default")
    assert sorted(deleted) == sorted([job_name("pretrain", RUN_ID), job_name("tune", RUN_ID)])
    assert [name for _, name in k8s_api.jobs] == [job_name("pretrain", "another-run")]
    assert delete_run_jobs(RUN_ID, api, "default") == []


# --- the local backend ---

def test_local_backend_runs_torchrun_and_saves_its_log(ckpt, capsys):
    script = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE']); print('/tmp/final.pt')"
    result = launch_local(_job(ckpt, command=[sys.executable, "-c", script]), nproc=1, timeout_s=120)
    assert result.tail.splitlines()[-1] == "/tmp/final.pt" and result.namespace == ""
    assert "rank 0 of 1" in capsys.readouterr().out
    assert "/tmp/final.pt" in Path(result.log_uris["local"]).read_text()


def test_local_backend_failure(ckpt):
    with pytest.raises(JobFailed, match=r"(?s)exit code 1\).*boom"):
        launch_local(_job(ckpt, command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
                     timeout_s=120)


# a worker that says who it is, then outlives any test unless it is stopped
_SLEEPER = "import os, signal, time; {setup}print('worker pid', os.getpid(), flush=True); time.sleep(120)"


def _worker_pid(text: str) -> int:
    return int(next(line for line in text.splitlines() if line.startswith("worker pid")).split()[-1])


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("setup, grace_s", [("", 30.0), ("signal.signal(signal.SIGTERM, signal.SIG_IGN); ", 1.0)],
                         ids=["stops-on-sigterm", "ignores-sigterm"])
def test_local_backend_timeout_stops_every_worker(ckpt, setup, grace_s):
    """torchrun starts each worker in a session of its own: a timeout must reach them (SIGTERM, then SIGKILL
    after the grace period for one that ignores it), not leave them running while the step reports a timeout."""
    start = time.monotonic()
    with pytest.raises(JobTimeout) as raised:
        launch_local(_job(ckpt, command=[sys.executable, "-c", _SLEEPER.format(setup=setup)]), timeout_s=4,
                     grace_s=grace_s)
    assert time.monotonic() - start < 40  # not the worker's 120 s
    assert _gone(_worker_pid(str(raised.value)))


def test_a_terminated_local_step_stops_its_job(ckpt, tmp_path):
    """SIGTERM to the step (KFP Terminate; Ctrl-C alike) stops torchrun and its workers before the step exits."""
    step = (f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'tests')]!r}\n"
            "from components.launcher import launch_local, StepTerminated\n"
            "from test_launcher import _job, _SLEEPER\n"
            f"try:\n    launch_local(_job({str(ckpt)!r}, command=[sys.executable, '-c', _SLEEPER.format(setup='')]),"
            " timeout_s=300)\n"
            "except StepTerminated as error:\n    print('TERMINATED', error, flush=True); sys.exit(143)\n")
    proc = subprocess.Popen([sys.executable, "-c", step], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until the worker runs
        lines.append(line)
        if line.startswith("worker pid"):
            break
    pid = _worker_pid("".join(lines))
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, rest
    assert "TERMINATED the step got SIGTERM" in rest and "rerun the step to resume" in rest
    assert _gone(pid)

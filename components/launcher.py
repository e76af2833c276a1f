"""Launch a distributed `maskdit train` run: as a Kubeflow PyTorchJob, or locally with torchrun.

The pretrain and tune pipeline steps are light pods that call `launch(...)`; the training itself
runs in the PyTorchJob's pods (Training Operator, kubeflow.org/v1), one `torchrun` per node.

Kubernetes backend, through the Kubeflow Training SDK (`kubeflow-training` 1.9, whose
`TrainingClient` wraps the kubernetes client's CustomObjectsApi / CoreV1Api):
  create (HTTP 409 = a retried step: attach to the job already there) -> stream the master's log
  -> wait for Succeeded/Failed with a timeout (on timeout delete the job) -> on failure raise with
  the job's reason/message and the master's last log lines.
`delete_run_jobs(run_id)` removes every job labelled with a pipeline run id (the ExitHandler step).

Local backend: `torchrun --standalone --nproc-per-node N --no-python maskdit train ...` as a
subprocess with the same command and environment, so the same DAG runs without a cluster.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
RUN_ID_LABEL = "pipeline/runid"  # the label KFP itself puts on a run's pods
STEP_LABEL = "maskdit/step"
CHECKPOINT_ANNOTATION = "maskdit/checkpoint-uri"
MASTER_SELECTOR = "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"

Backend = Literal["kubernetes", "local"]


class LaunchError(RuntimeError):
    """The training job could not be created, failed, or did not finish in time."""


class JobFailed(LaunchError):
    pass


class JobTimeout(LaunchError):
    pass


@dataclass
class TrainJob:
    """One distributed training run, as typed parameters (the PyTorchJob is built from these).

    command: what each process runs, e.g. ["maskdit", "train", "--config", "...", "key=value"];
    torchrun (started once per node) runs it `gpus_per_node` times (at least once).
    checkpoint_uri: where the run writes (and resumes) its checkpoints; recorded on the job.
    secrets / config_maps: names of Kubernetes Secrets / ConfigMaps whose keys become environment
    variables (S3 credentials, MLflow address and credentials).
    """

    step: str
    run_id: str
    image: str
    command: list[str]
    checkpoint_uri: str
    nodes: int = 1
    gpus_per_node: int = 8
    cpu: str = "64"
    memory: str = "900Gi"
    shm_size: str = "64Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    config_maps: list[str] = field(default_factory=list)
    backoff_limit: int = 3

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: a PyTorchJob needs at least one node")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node}: use 0 for CPU-only nodes")
        if not self.command:
            raise ValueError("command is empty: pass the maskdit command to run, e.g. ['maskdit', 'train', ...]")

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def name(self) -> str:
        return job_name(self.step, self.run_id)


def label_value(text: str) -> str:
    """`text` as a valid Kubernetes label value (<= 63 of [-_.A-Za-z0-9], alphanumeric at both ends)."""
    value = re.sub(r"[^-_.A-Za-z0-9]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def job_name(step: str, run_id: str) -> str:
    """The job's name: unique to (pipeline run, step), the same on a retry so that it re-attaches."""
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
    return f"maskdit-{label_value(step).lower()[:30]}-{digest}"


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------

def _container(job: TrainJob) -> dict:
    resources = {"cpu": job.cpu, "memory": job.memory}
    if job.gpus_per_node:
        resources["nvidia.com/gpu"] = str(job.gpus_per_node)
    container = {
        "name": CONTAINER,
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        # nnodes, node rank, nproc per node and the master address come from the operator (PET_* env)
        "command": ["torchrun", "--no-python", *job.command],
        "env": [{"name": k, "value": v} for k, v in sorted(job.env.items())],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    env_from = [{"configMapRef": {"name": c}} for c in job.config_maps]
    env_from += [{"secretRef": {"name": s}} for s in job.secrets]
    if env_from:
        container["envFrom"] = env_from
    return container


def _replica(job: TrainJob, replicas: int) -> dict:
    pod_spec = {
        "containers": [_container(job)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}],
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",  # a preempted node resumes from the last checkpoint
        "template": {
            "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}, "labels": _labels(job)},
            "spec": pod_spec,
        },
    }


def _labels(job: TrainJob) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "maskdit", RUN_ID_LABEL: label_value(job.run_id),
            STEP_LABEL: label_value(job.step)}


def build_pytorchjob(job: TrainJob) -> dict:
    """The PyTorchJob (kubeflow.org/v1) for `job`: a Master, plus `nodes - 1` Workers."""
    replica_specs = {"Master": _replica(job, 1)}
    if job.nodes > 1:
        replica_specs["Worker"] = _replica(job, job.nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": job.name,
            "labels": _labels(job),
            "annotations": {CHECKPOINT_ANNOTATION: job.checkpoint_uri, "sidecar.istio.io/inject": "false"},
        },
        "spec": {
            "nprocPerNode": str(job.procs_per_node),
            # cleanPodPolicy None keeps the finished pods, so their logs stay readable
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": job.backoff_limit},
            "pytorchReplicaSpecs": replica_specs,
        },
    }


# --------------------------------------------------------------------------------------------
# Kubernetes backend
# --------------------------------------------------------------------------------------------

def training_client(namespace: str | None = None, configuration=None):
    """A Kubeflow `TrainingClient`: in-cluster credentials in a pod, else ~/.kube/config.

    `configuration` (a kubernetes.client.Configuration) overrides both, e.g. for a stand-in server.
    """
    from kubeflow.training import TrainingClient
    from kubernetes import config

    if configuration is None:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config()
        from kubernetes import client

        configuration = client.Configuration.get_default_copy()
    kwargs = {"namespace": namespace} if namespace else {}
    return TrainingClient(client_configuration=configuration, job_kind=KIND, **kwargs)


def _http_status(error: BaseException) -> int | None:
    while error is not None:
        if getattr(error, "status", None) is not None:
            return error.status
        error = error.__cause__
    return None


def _api_message(error: BaseException) -> str:
    """The API server's own words for a failed request (its Status message), else the error text."""
    cause = error
    while cause is not None and getattr(cause, "body", None) is None:
        cause = cause.__cause__
    try:
        status = json.loads(cause.body)
        return f"HTTP {status['code']} {status['reason']}: {status['message']}"
    except Exception:
        return str(error)


def _master_pod(api, name: str, namespace: str):
    pods = api.core_api.list_namespaced_pod(namespace, label_selector=MASTER_SELECTOR.format(name=name)).items
    return pods[0] if pods else None


def tail_master_log(api, name: str, namespace: str, lines: int = 50) -> str:
    """The last `lines` lines of the master pod's training container ('' when there is no pod yet)."""
    try:
        pod = _master_pod(api, name, namespace)
        if pod is None or (pod.status and pod.status.phase == "Pending"):
            return ""
        return api.core_api.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER,
                                                    tail_lines=lines)
    except Exception as e:  # the log is diagnostics: never hide the job's own outcome behind it
        return f"(could not read the master's log of {namespace}/{name}: {e})"


def _stream_master_log(api, name: str, namespace: str, stop: threading.Event, out) -> None:
    """Print the master's log as it is written (follows the pod from Running to its end)."""
    from kubernetes import watch

    while not stop.is_set():
        try:
            pod = _master_pod(api, name, namespace)
        except Exception:
            pod = None
        if pod is not None and pod.status and pod.status.phase not in (None, "Pending"):
            break
        stop.wait(1.0)
    else:
        return
    try:
        for line in watch.Watch().stream(api.core_api.read_namespaced_pod_log, name=pod.metadata.name,
                                         namespace=namespace, container=CONTAINER):
            print(f"[{pod.metadata.name}] {line}", file=out, flush=True)
            if stop.is_set():
                return
    except Exception as e:
        print(f"[launcher] log stream of {pod.metadata.name} ended: {e}", file=out, flush=True)


def launch_kubernetes(job: TrainJob, api, namespace: str | None = None, timeout_s: float = 86400.0,
                      poll_s: float = 15.0, tail_lines: int = 50, out=None) -> str:
    """Run `job` as a PyTorchJob through `api` (a TrainingClient) and return the master's log tail."""
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.utils.utils import FakeResponse

    out = out or sys.stdout
    namespace = namespace or api.namespace
    manifest = build_pytorchjob(job)
    body = ApiClient().deserialize(FakeResponse(manifest), models.KubeflowOrgV1PyTorchJob)
    try:
        api.create_job(job=body, namespace=namespace)
        print(f"[launcher] created PyTorchJob {namespace}/{job.name}", file=out, flush=True)
    except RuntimeError as e:
        if _http_status(e) != 409:
            raise LaunchError(f"could not create PyTorchJob {namespace}/{job.name}: {_api_message(e)}") from e
        print(f"[launcher] PyTorchJob {namespace}/{job.name} already exists (a retried step): attaching",
              file=out, flush=True)

    stop = threading.Event()
    streamer = threading.Thread(target=_stream_master_log, args=(api, job.name, namespace, stop, out), daemon=True)
    streamer.start()
    try:
        result = api.wait_for_job_conditions(job.name, namespace, expected_conditions={"Succeeded", "Failed"},
                                             wait_timeout=timeout_s, polling_interval=poll_s)
    except TimeoutError as e:
        stop.set()
        tail = tail_master_log(api, job.name, namespace, tail_lines)
        api.delete_job(job.name, namespace)
        raise JobTimeout(f"PyTorchJob {namespace}/{job.name} did not finish within {timeout_s:.0f}s and was "
                         f"deleted; raise the step's timeout or check the cluster. Last log lines:\n{tail}") from e
    except RuntimeError as e:
        stop.set()
        raise LaunchError(f"lost track of PyTorchJob {namespace}/{job.name}: {_api_message(e)}") from e
    finally:
        streamer.join(timeout=5.0)
        stop.set()

    conditions = {c.type: c for c in (result.status.conditions or []) if c.status == "True"}
    tail = tail_master_log(api, job.name, namespace, tail_lines)
    if "Failed" in conditions:
        cond = conditions["Failed"]
        raise JobFailed(f"PyTorchJob {namespace}/{job.name} failed: {cond.reason}: {cond.message}\n"
                        f"last {tail_lines} lines of the master's log:\n{tail}")
    print(f"[launcher] PyTorchJob {namespace}/{job.name} succeeded", file=out, flush=True)
    return tail


def delete_run_jobs(run_id: str, api, namespace: str | None = None) -> list[str]:
    """Delete every PyTorchJob labelled with pipeline run `run_id`; return their names."""
    namespace = namespace or api.namespace
    listed = api.custom_api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"{RUN_ID_LABEL}={label_value(run_id)}")
    names = [item["metadata"]["name"] for item in listed.get("items", [])]
    for name in names:
        try:
            api.delete_job(name, namespace)
        except RuntimeError as e:
            if _http_status(e) != 404:  # already gone is what we wanted
                raise
    return names


# --------------------------------------------------------------------------------------------
# Local backend
# --------------------------------------------------------------------------------------------

def _executable(name: str) -> str:
    """`name` from this interpreter's environment first (a venv need not be on PATH)."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)


def local_command(job: TrainJob, nproc: int) -> list[str]:
    """The torchrun command that runs `job` on this machine with `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--no-python", _executable(job.command[0]), *job.command[1:]]


def launch_local(job: TrainJob, nproc: int = 1, timeout_s: float = 86400.0, tail_lines: int = 50,
                 out=None) -> str:
    """Run `job` with torchrun here, streaming its output; return the last `tail_lines` lines."""
    out = out or sys.stdout
    cmd = local_command(job, nproc)
    print(f"[launcher] {' '.join(cmd)}", file=out, flush=True)
    env = {**os.environ, **job.env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        for line in proc.stdout:
            print(line, end="", file=out, flush=True)
            tail.append(line.rstrip("\n"))
        code = proc.wait()
    finally:
        timer.cancel()
    text = "\n".join(tail)
    if timed_out.is_set():
        raise JobTimeout(f"local training job {job.name} did not finish within {timeout_s:.0f}s and was killed. "
                         f"Last log lines:\n{text}")
    if code != 0:
        raise JobFailed(f"local training job {job.name} failed (exit code {code}). Last log lines:\n{text}")
    return text


def launch(job: TrainJob, backend: Backend = "kubernetes", *, namespace: str | None = None,
           timeout_s: float = 86400.0, local_nproc: int = 1, api=None, poll_s: float = 15.0) -> str:
    """Run `job` on `backend` and return the tail of its (master's) log."""
    if backend == "kubernetes":
        return launch_kubernetes(job, api or training_client(namespace), namespace, timeout_s, poll_s)
    if backend == "local":
        return launch_local(job, local_nproc, timeout_s)
    raise ValueError(f"backend={backend!r}: use 'kubernetes' (a PyTorchJob) or 'local' (torchrun here)")


def last_line(log: str) -> str:
    """The last non-empty line of a log (the `maskdit train` result: the final checkpoint URI)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if not lines:
        raise LaunchError("the training job printed nothing: expected the final checkpoint URI as its last line")
    return lines[-1]

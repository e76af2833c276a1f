"""The PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1) a training step runs: its typed
parameters (`TrainJob`), its name and labels, and the manifest built from them.

components/launcher.py creates and watches it; components/kube_logs.py reads its pods' logs.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from components.cluster import ClusterSettings

_DEFAULTS = ClusterSettings()  # the one declaration of the defaults (components/cluster.py)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
RUN_ID_LABEL = "pipeline/runid"  # the label KFP itself puts on a run's pods
STEP_LABEL = "maskdit/step"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CHECKPOINT_ANNOTATION = "maskdit/checkpoint-uri"
DEADLINE_ANNOTATION = "maskdit/deadline"
JOB_SELECTOR = "training.kubeflow.org/job-name={name}"
IMAGE_UID = 10001  # the image's user (docker/Dockerfile ARG UID)
OWNER_ENV = ("MASKDIT_POD_NAME", "MASKDIT_POD_UID", "MASKDIT_POD_NAMESPACE")  # the step pod (downward API)
EXIT_MARGIN_S = 30  # after training's grace period: torchrun and the interpreter exit
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class TrainJob:
    """One distributed training run, as typed parameters (the PyTorchJob or the Trainer v2 TrainJob is built from these).

    command: what each process runs, e.g. ["maskdit", "train", "--config", "...", "key=value"];
    torchrun (started once per node) runs it `gpus_per_node` times (at least once).
    checkpoint_uri: where the run writes (and resumes) its checkpoints; the launcher keeps its deadline marker
    (`launcher/deadline.json`) and the replicas' logs (`logs/<pod>.log`) there too.
    Resources per node, sized for a 96-vCPU / 680 GiB 8xA100 node with headroom for the kubelet and daemon
    sets; `cpu_limit` "" = no CPU limit. The /dev/shm emptyDir counts against `memory_limit`.
    secrets / config_maps: names of Kubernetes Secrets / ConfigMaps whose keys become environment
    variables (S3 credentials, MLflow address and credentials).
    backoff_limit: restarts of the job (retryable exit codes, evictions) before it fails.
    queue_name: a Kueue LocalQueue to admit the job through ("" = no Kueue).
    priority_class_name: the pods' PriorityClass ("" = the cluster's default).
    grace_period_s: checkpoint.grace_period_s of the training command; the pods get
    `termination_grace_s` of it (SIGKILL comes only after training had its whole period).
    """

    step: str
    run_id: str
    image: str
    command: list[str]
    checkpoint_uri: str
    nodes: int = _DEFAULTS.nodes
    gpus_per_node: int = _DEFAULTS.gpus_per_node
    cpu_request: str = _DEFAULTS.cpu_request
    cpu_limit: str = _DEFAULTS.cpu_limit
    memory_request: str = _DEFAULTS.memory_request
    memory_limit: str = _DEFAULTS.memory_limit
    shm_size: str = _DEFAULTS.shm_size
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    config_maps: list[str] = field(default_factory=list)
    backoff_limit: int = _DEFAULTS.backoff_limit
    queue_name: str = ""
    priority_class_name: str = ""
    grace_period_s: float = _DEFAULTS.grace_period_s

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: a training job needs at least one node")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node}: use 0 for CPU-only nodes")
        if self.backoff_limit < 0:
            raise ValueError(f"backoff_limit={self.backoff_limit}: use 0 for no restarts")
        if self.grace_period_s <= 0:
            raise ValueError(f"grace_period_s={self.grace_period_s}: give the pods > 0 s to checkpoint on SIGTERM")
        if not self.command:
            raise ValueError("command is empty: pass the maskdit command to run, e.g. ['maskdit', 'train', ...]")

    @classmethod
    def from_settings(cls, settings: ClusterSettings, **fields) -> TrainJob:
        """A job placed and sized by the pipeline's cluster settings; `fields`: what, where, env."""
        placement = settings.model_dump(exclude={"backend", "job_api", "runtime", "namespace", "pending_timeout_hours",
                                                 "local_nproc"})
        return cls(**placement, **fields)

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
    requests = {"cpu": job.cpu_request, "memory": job.memory_request}
    limits = {"memory": job.memory_limit, **({"cpu": job.cpu_limit} if job.cpu_limit else {})}
    if job.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(job.gpus_per_node)
    container = {
        "name": CONTAINER,
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        # torchrun's wrapper: nnodes, node rank, nproc per node and the master address come from the operator
        # (PET_* env); worker exit codes become 2 (user error: no restart) or 143 (retryable)
        "command": ["python", "-m", "maskdit.elastic", "--no-python", *job.command],
        "env": [{"name": k, "value": v} for k, v in sorted(job.env.items())],
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    env_from = [{"configMapRef": {"name": c}} for c in job.config_maps]
    env_from += [{"secretRef": {"name": s}} for s in job.secrets]
    if env_from:
        container["envFrom"] = env_from
    return container


def termination_grace_s(grace_period_s: float) -> int:
    """The pods' terminationGracePeriodSeconds: training's own grace period, plus time for torchrun and the
    process to exit after the checkpoint (maskdit.elastic exits 143 at `grace_period_s` at the latest)."""
    return math.ceil(grace_period_s) + EXIT_MARGIN_S


def _replica(job: TrainJob, replicas: int) -> dict:
    pod_spec = {
        "terminationGracePeriodSeconds": termination_grace_s(job.grace_period_s),
        "automountServiceAccountToken": False,  # training talks to S3 and MLflow, never to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "fsGroup": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(job)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}],
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.priority_class_name:
        pod_spec["priorityClassName"] = job.priority_class_name
    return {
        "replicas": replicas,
        # exit codes 1-127 (a user error: 2) fail the job at once; 128-255 (143: SIGTERM, preemption) and
        # evictions restart the pod, which resumes from the last checkpoint (up to backoffLimit times)
        "restartPolicy": "ExitCode",
        "template": {
            "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}, "labels": labels(job)},
            "spec": pod_spec,
        },
    }


def labels(job: TrainJob) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "maskdit", RUN_ID_LABEL: label_value(job.run_id),
            STEP_LABEL: label_value(job.step)}


def step_pod_owner(namespace: str, environ=os.environ) -> dict | None:
    """An ownerReference to the step's own pod (from MASKDIT_POD_NAME/_UID/_NAMESPACE), or None.

    None outside a pod (local runs), and when the pod runs in another namespace than the job: Kubernetes
    treats a cross-namespace owner as absent and would garbage-collect the job at once.
    """
    name, uid, pod_namespace = (environ.get(k, "") for k in OWNER_ENV)
    if not (name and uid):
        return None
    if not pod_namespace and SERVICE_ACCOUNT_NAMESPACE.is_file():
        pod_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    if pod_namespace != namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid,
            "controller": False, "blockOwnerDeletion": False}


def build_pytorchjob(job: TrainJob, *, owner: dict | None = None, deadline: str = "") -> dict:
    """The PyTorchJob (kubeflow.org/v1) for `job`: a Master, plus `nodes - 1` Workers.

    owner: an ownerReference (see `step_pod_owner`); deadline: when the launcher deletes the job (UTC, ISO).
    """
    replica_specs = {"Master": _replica(job, 1)}
    if job.nodes > 1:
        replica_specs["Worker"] = _replica(job, job.nodes - 1)
    job_labels = labels(job)
    if job.queue_name:
        job_labels[QUEUE_LABEL] = job.queue_name
    annotations = {CHECKPOINT_ANNOTATION: job.checkpoint_uri, "sidecar.istio.io/inject": "false"}
    if deadline:
        annotations[DEADLINE_ANNOTATION] = deadline
    metadata = {"name": job.name, "labels": job_labels, "annotations": annotations}
    if owner:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(job.procs_per_node),
            # cleanPodPolicy None keeps the finished pods, so their logs stay readable
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": job.backoff_limit},
            "pytorchReplicaSpecs": replica_specs,
        },
    }

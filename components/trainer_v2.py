"""The TrainJob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) a training step runs: its manifest.

The runtime (the ClusterTrainingRuntime `maskdit`, k8s/steps/trainingruntime.yaml) holds what every run
shares: the torch ML policy, the JobSet with its failure policy (exit code 2 fails the job, 143 and
evictions restart it), the image's user, no service-account token, /dev/shm and the Secrets as env.
The TrainJob carries only what changes per run: the command, resources, node count and processes per
node, and, as a runtime patch, node selector, tolerations, labels, /dev/shm's size and the restricted
security context (repeated, so that a runtime edited by hand cannot loosen it).
Built from the same `TrainJob` description as the PyTorchJob (components/pytorchjob.py).
"""

from __future__ import annotations

from components.cluster import ClusterSettings
from components.launch_base import LaunchError
from components.pytorchjob import (
    CHECKPOINT_ANNOTATION,
    DEADLINE_ANNOTATION,
    IMAGE_UID,
    QUEUE_LABEL,
    TrainJob,
    labels,
    termination_grace_s,
)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME_KIND = "ClusterTrainingRuntime"
CONTAINER = "node"  # the torch runtime's trainer container (Trainer injects PET_* into it)
REPLICATED_JOB = "node"  # the runtime's one replicated Job: an Indexed Job, one pod per node
PATCH_MANAGER = "maskdit.launcher"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass
# What the runtime passes as env to every run (envFrom in k8s/steps/trainingruntime.yaml); a TrainJob cannot add more
RUNTIME_SECRETS = ("maskdit-s3", "maskdit-mlflow")
RUNTIME_CONFIG_MAPS = ("maskdit-config",)
_DEFAULT_BACKOFF_LIMIT = ClusterSettings().backoff_limit  # = the runtime's failurePolicy.maxRestarts


class TrainJobSpecError(LaunchError):
    """A `TrainJob` asks for what a Trainer v2 TrainJob cannot carry per run."""


def _check(job: TrainJob) -> None:
    extra = sorted(set(job.secrets) - set(RUNTIME_SECRETS)) + sorted(set(job.config_maps) - set(RUNTIME_CONFIG_MAPS))
    if extra:
        raise TrainJobSpecError(
            f"the TrainJob cannot add envFrom {extra}: the runtime passes only {list(RUNTIME_SECRETS)} and "
            f"{list(RUNTIME_CONFIG_MAPS)}; add them to the runtime (k8s/steps/trainingruntime.yaml) or use "
            f"job_api=pytorchjob")
    if job.priority_class_name and not job.queue_name:
        raise TrainJobSpecError(
            f"priority_class_name={job.priority_class_name!r} with a TrainJob needs Kueue: Trainer v2.3 runtime "
            f"patches cannot set a pod's priorityClassName, so it becomes the Kueue WorkloadPriorityClass label; "
            f"set queue_name too, put priorityClassName in the runtime, or use job_api=pytorchjob")


def ignored_settings(job: TrainJob, runtime: str = "maskdit") -> list[str]:
    """What in `job` a TrainJob does not carry, one line each saying what Trainer v2 does instead ([] = nothing).
    (A setting it cannot carry and would change the run, e.g. a priority class without Kueue, is refused in
    `build_trainjob`; these only differ in how failures are retried.)"""
    if job.backoff_limit == _DEFAULT_BACKOFF_LIMIT:
        return []
    return [(f"backoff_limit={job.backoff_limit} does not apply to a TrainJob: Trainer v2 restarts it by the "
             f"runtime's JobSet failurePolicy.maxRestarts (ClusterTrainingRuntime {runtime}; "
             f"{_DEFAULT_BACKOFF_LIMIT} in k8s/components/trainer-v2/trainingruntime.yaml) and Kueue requeues it when "
             f"it preempts it; change maxRestarts in the runtime, or use job_api=pytorchjob")]


def build_trainjob(job: TrainJob, *, owner: dict | None = None, deadline: str = "",
                   runtime: str = "maskdit") -> dict:
    """The TrainJob for `job`, running on ClusterTrainingRuntime `runtime`: `nodes` pods of `procs_per_node`
    processes each. owner: an ownerReference (`step_pod_owner`); deadline: when the launcher deletes it."""
    _check(job)
    requests = {"cpu": job.cpu_request, "memory": job.memory_request}
    limits = {"memory": job.memory_limit, **({"cpu": job.cpu_limit} if job.cpu_limit else {})}
    if job.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(job.gpus_per_node)
    meta_labels = labels(job)
    if job.queue_name:
        meta_labels[QUEUE_LABEL] = job.queue_name
    if job.priority_class_name:
        meta_labels[KUEUE_PRIORITY_LABEL] = job.priority_class_name
    annotations = {CHECKPOINT_ANNOTATION: job.checkpoint_uri}
    if deadline:
        annotations[DEADLINE_ANNOTATION] = deadline
    metadata = {"name": job.name, "labels": meta_labels, "annotations": annotations}
    if owner:
        metadata["ownerReferences"] = [owner]
    pod_spec = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "fsGroup": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": CONTAINER,
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}],
        "terminationGracePeriodSeconds": termination_grace_s(job.grace_period_s),  # the checkpoint on SIGTERM
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    pod_template = {"metadata": {"labels": labels(job), "annotations": {"sidecar.istio.io/inject": "false"}},
                    "spec": pod_spec}
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": REPLICATED_JOB, "template": {"spec": {"template": pod_template}}}]}}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime},
            "trainer": {
                "image": job.image,
                # as in the PyTorchJob: torchrun's wrapper reads PET_* (set by the torch ML policy) and maps the
                # workers' exit codes to 2 (permanent) or 143 (retryable): the runtime's podFailurePolicy acts on them
                "command": ["python", "-m", "maskdit.elastic", "--no-python", *job.command],
                "env": [{"name": k, "value": v} for k, v in sorted(job.env.items())],
                "numNodes": job.nodes,
                "numProcPerNode": job.procs_per_node,
                "resourcesPerNode": {"requests": requests, "limits": limits},
            },
            "runtimePatches": [patch],
        },
    }

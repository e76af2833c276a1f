"""The two kinds of training job the launcher runs, behind one interface, and which one a cluster has.

`JobKind` is everything the launcher, the API calls and the log follower need to know about a kind:
its API (group, version, plural), how its manifest is built from a `TrainJob`, how its pods are
selected (all, and the master: the node of rank 0), the training container's name, and how its
status says Succeeded / Failed / Suspended. Every guarantee of components/launcher.py is written
once against this interface and so holds for both kinds:

- PYTORCHJOB: kubeflow.org/v1 PyTorchJob (Training Operator v1.9, standalone clusters);
- TRAINJOB: trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2.3, on JobSet) on the
  ClusterTrainingRuntime `maskdit` (k8s/steps/trainingruntime.yaml).

`resolve(job_api, installed)` picks one: "auto" asks the API server's discovery which is installed
and prefers TrainJob when both are (`installed_kinds`, through components/kube_calls.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from components import pytorchjob, trainer_v2
from components.launch_base import LaunchError
from components.pytorchjob import TrainJob

JobApi = Literal["auto", "trainjob", "pytorchjob"]
JOB_APIS = ("auto", "trainjob", "pytorchjob")


class NoJobApi(LaunchError):
    """The cluster serves neither training-job API (or not the one asked for)."""


@dataclass(frozen=True)
class JobKind:
    """One kind of training job (see the module docstring)."""

    key: str  # the `job_api` value that names it
    kind: str
    group: str
    version: str
    plural: str
    container: str
    pod_label: str  # the label every pod of the job carries, valued with the job's name
    master_labels: str  # more `key=value` terms that select the master (rank 0) among them
    succeeded: str  # the condition type that means success
    installs: str  # what to install for it (docs/operating.md)
    build: Callable[..., dict]  # (job, owner=, deadline=, runtime=) -> manifest
    ignores: Callable[[TrainJob, str], list[str]]  # (job, runtime) -> a line for each setting the kind does not carry

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"

    def pods(self, name: str) -> str:
        return f"{self.pod_label}={name}"

    def master(self, name: str) -> str:
        return f"{self.pods(name)},{self.master_labels}"

    def manifest(self, job: TrainJob, *, owner: dict | None = None, deadline: str = "", runtime: str = "") -> dict:
        return self.build(job, owner=owner, deadline=deadline, runtime=runtime)

    def ignored(self, job: TrainJob, runtime: str = "") -> list[str]:
        """A warning line for each setting of `job` this kind does not carry (and what it does instead)."""
        return self.ignores(job, runtime or "maskdit")

    def state(self, obj: dict) -> dict[str, dict]:
        """The job's True conditions as Succeeded / Failed / Suspended (the kind's own names mapped)."""
        names = {self.succeeded: "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}
        return {names[c["type"]]: c for c in (obj.get("status") or {}).get("conditions") or []
                if c.get("status") == "True" and c.get("type") in names}


def _pytorchjob(job: TrainJob, *, owner: dict | None = None, deadline: str = "", runtime: str = "") -> dict:
    return pytorchjob.build_pytorchjob(job, owner=owner, deadline=deadline)  # no runtime: the operator is it


def _trainjob(job: TrainJob, *, owner: dict | None = None, deadline: str = "", runtime: str = "") -> dict:
    return trainer_v2.build_trainjob(job, owner=owner, deadline=deadline, runtime=runtime or "maskdit")


PYTORCHJOB = JobKind(
    key="pytorchjob", kind=pytorchjob.KIND, group=pytorchjob.GROUP, version=pytorchjob.VERSION,
    plural=pytorchjob.PLURAL, container=pytorchjob.CONTAINER, pod_label="training.kubeflow.org/job-name",
    master_labels="training.kubeflow.org/replica-type=master", succeeded="Succeeded",
    installs="Kubeflow Training Operator v1.9", build=_pytorchjob, ignores=lambda job, runtime: [])
TRAINJOB = JobKind(
    key="trainjob", kind=trainer_v2.KIND, group=trainer_v2.GROUP, version=trainer_v2.VERSION,
    plural=trainer_v2.PLURAL, container=trainer_v2.CONTAINER, pod_label="jobset.sigs.k8s.io/jobset-name",
    master_labels=f"jobset.sigs.k8s.io/replicatedjob-name={trainer_v2.REPLICATED_JOB},"
                  "batch.kubernetes.io/job-completion-index=0",
    succeeded="Complete", installs="Kubeflow Trainer v2.3", build=_trainjob, ignores=trainer_v2.ignored_settings)
KINDS = {k.key: k for k in (TRAINJOB, PYTORCHJOB)}  # in the order "auto" prefers them


def resolve(job_api: str, installed: Callable[[JobKind], bool]) -> JobKind:
    """The kind to run for `job_api`; `installed(kind)` asks the API server's discovery (called only as needed)."""
    if job_api not in JOB_APIS:
        raise NoJobApi(f"job_api={job_api!r} is not known: use one of {', '.join(JOB_APIS)}")
    wanted = [KINDS[job_api]] if job_api != "auto" else list(KINDS.values())
    for kind in wanted:
        if installed(kind):
            return kind
    if job_api == "auto":
        raise NoJobApi(f"the cluster serves neither {TRAINJOB.resource} ({TRAINJOB.installs}) nor "
                       f"{PYTORCHJOB.resource} ({PYTORCHJOB.installs}): install one (docs/operating.md), or run "
                       f"with backend=local")
    kind = KINDS[job_api]
    other = next(k for k in KINDS.values() if k is not kind)
    hint = f"or use job_api={other.key} if the cluster has {other.installs}"
    raise NoJobApi(f"job_api={job_api}, but the cluster does not serve {kind.resource}: install {kind.installs} "
                   f"(docs/operating.md), {hint}, or job_api=auto")

"""Launch a distributed `maskdit train` run: as a Kubeflow TrainJob or PyTorchJob, or locally with torchrun.

The pretrain and tune pipeline steps are light pods that call `launch(...)`; the training itself
runs in the job's pods, one `torchrun` per node (through `maskdit.elastic`, which maps the workers'
exit codes to 2 = permanent, 143 = retryable). The job is of one of two kinds (components/jobkind.py,
chosen by `job_api`, "auto" through the API server's discovery): a Trainer v2 TrainJob
(trainer.kubeflow.org/v1alpha1, components/trainer_v2.py) or a Training Operator PyTorchJob
(kubeflow.org/v1, components/pytorchjob.py). Everything below is written once, against `JobKind`.

Kubernetes backend, through the kubernetes client (the Kubeflow Training SDK's `TrainingClient`
holds it): every call has its own timeout and retries transient failures (connection errors, 429,
5xx, timeouts) with exponential backoff and jitter until the step's deadline; permanent ones (400,
403, 404, 422) fail at once with the API server's message (components/kube_calls.py).

  claim the deadline (a marker beside the checkpoints keeps it across step retries) -> create,
  owned by the step's pod (HTTP 409 = a retried step: attach, and add its pod as an owner) ->
  follow the master's log across restarts (components/kube_logs.py) -> poll the job and its pods
  until Succeeded/Failed, a pod Pending too long, the deadline, or SIGTERM to the step -> save
  every replica's log beside the checkpoints -> on the deadline, a stuck pod or KFP Terminate delete the
  job (a drain keeps it for the retry: launch_drain.py) -> return a `LaunchResult`, or raise with the cause,
  the pods' OOM kills / evictions, where the logs are and the master's last lines. docs/operating.md says what each event and KFP action does.
`delete_run_jobs(run_id)` removes every job labelled with a pipeline run id (the ExitHandler step).

Local backend (components/launch_local.py): torchrun on this machine with the same command and
environment, so the same DAG runs without a cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

from components.jobkind import KINDS, JobKind, NoJobApi, resolve
from components.kube_calls import (
    Calls,
    OutOfTime,
    api_message,
    describe,
    http_status,
    training_client,
)
from components.kube_logs import MasterLog, save_replica_logs
from components.kube_pods import Incidents, pending_reason
from components.launch_base import (  # noqa: F401 (the errors are part of this module's interface)
    TERMINATED_CLEANUP_S,
    Backend,
    DeadlinePassed,
    JobFailed,
    JobPending,
    JobTimeout,
    LaunchError,
    LaunchResult,
    StepEvicted,
    StepTerminated,
    Terminated,
    poll_interval,
    sigterm_raises,
)
from components.launch_drain import release_job, step_pod_disruption
from components.launch_local import launch_local
from components.pytorchjob import (
    DEADLINE_ANNOTATION,
    OWNER_ENV,
    RUN_ID_LABEL,
    TrainJob,
    label_value,
    step_pod_owner,
)
from maskdit.core import storage


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


# --------------------------------------------------------------------------------------------
# The deadline, kept across step retries
# --------------------------------------------------------------------------------------------

def deadline_marker(job: TrainJob) -> str:
    return storage.join(job.checkpoint_uri, "launcher", "deadline.json")


def _claim_deadline(job: TrainJob, kind: JobKind, namespace: str, timeout_s: float) -> float:
    """The step's deadline (epoch seconds): an earlier try's, else now + timeout_s (recorded). Refuses after one."""
    uri = deadline_marker(job)
    if storage.exists(uri):
        marker = json.loads(storage.get_bytes(uri))
        if marker.get("passed_at"):
            raise DeadlinePassed(
                f"{marker.get('kind', 'PyTorchJob')} {marker['namespace']}/{marker['job']} reached its deadline "
                f"({marker['timeout_s']:.0f}s, "
                f"at {marker['deadline']}) in an earlier try of this step and was deleted at {marker['passed_at']}; "
                f"not starting it again. Its checkpoints stay in {job.checkpoint_uri}. To train on, start a new run "
                f"with a larger timeout, or delete {uri} to give this run a new deadline.")
        return _epoch(marker["deadline"])
    deadline = time.time() + timeout_s
    marker = {"job": job.name, "kind": kind.kind, "namespace": namespace, "timeout_s": timeout_s, "deadline": _iso(deadline),
              "passed_at": None}
    storage.put_bytes(uri, json.dumps(marker, indent=1).encode())
    return deadline


def _mark_deadline_passed(job: TrainJob) -> None:
    uri = deadline_marker(job)
    marker = json.loads(storage.get_bytes(uri))
    marker["passed_at"] = _iso(time.time())
    storage.put_bytes(uri, json.dumps(marker, indent=1).encode())


# --------------------------------------------------------------------------------------------
# Kubernetes backend
# --------------------------------------------------------------------------------------------

class _Stuck(Exception):
    pass


def _wait(calls: Calls, name: str, namespace: str, deadline: float, poll_s: float, pending_timeout_s: float,
          incidents: Incidents, out) -> dict:
    """Poll the job until it is Succeeded or Failed; return its True conditions by type."""
    pending_since: dict[str, float] = {}
    queued = False
    while True:
        try:
            job = calls.get_job(name, until=deadline)
        except OutOfTime:
            raise
        except Exception as error:
            if http_status(error) == 404:
                raise JobFailed(f"{calls.kind.kind} {namespace}/{name} was deleted while this step waited for it (by hand, "
                                f"by the run's cleanup, or by garbage collection after the step's pod went away)")
            raise
        conditions = calls.kind.state(job)
        pods = calls.list_pods(calls.kind.pods(name), until=deadline)
        incidents.note(pods)
        if "Succeeded" in conditions or "Failed" in conditions:
            return conditions
        if "Suspended" in conditions and not queued:
            queued = True
            print(f"[launcher] {calls.kind.kind} {namespace}/{name} is suspended (queued by Kueue): waiting", file=out,
                  flush=True)
        now = time.monotonic()
        pending = {p["metadata"]["uid"]: p for p in pods if (p.get("status") or {}).get("phase") == "Pending"}
        pending_since = {uid: pending_since.get(uid, now) for uid in pending}
        for uid, since in pending_since.items():
            if now - since > pending_timeout_s:
                pod = pending[uid]
                raise _Stuck(f"pod {pod['metadata']['name']} has been Pending for more than {pending_timeout_s:.0f}s: "
                             f"{pending_reason(pod)}")
        if now >= deadline:
            raise OutOfTime("waiting for the job", None)
        time.sleep(min(poll_s, max(deadline - now, 0.0)))


def _delete_job(calls: Calls, name: str, until: float) -> str:
    """Delete the job (retrying); '' when done or already gone, else why it could not be deleted."""
    try:
        calls.delete_job(name, until=until)
    except Exception as error:
        if http_status(error) != 404:
            return (f"; it could NOT be deleted ({api_message(error)}): delete it by hand with "
                    f"kubectl -n {calls.namespace} delete {calls.kind.resource} {name}")
    return ""


def launch_kubernetes(job: TrainJob, api, namespace: str | None = None, timeout_s: float = 86400.0,
                      poll_s: float = 15.0, *, pending_timeout_s: float = 3600.0, call_timeout_s: float = 30.0,
                      backoff_s: float = 1.0, cleanup_s: float = 120.0, tail_lines: int = 50,
                      out=None, job_api: str = "auto", runtime: str = "maskdit") -> LaunchResult:
    """Run `job` as a TrainJob or PyTorchJob (`job_api`) through `api` (a TrainingClient); see the module docstring."""
    out = out or sys.stdout
    namespace = namespace or api.namespace
    name = job.name
    calls = Calls(api, namespace, call_timeout_s=call_timeout_s, backoff_s=backoff_s, out=out)
    kind = job_kind(calls, job_api, until=time.monotonic() + max(cleanup_s, call_timeout_s))
    manifest = kind.manifest(job, runtime=runtime)  # a spec the kind cannot carry fails here, before anything runs
    calls = calls.with_kind(kind)
    print(f"[launcher] running {name} as a {kind.kind} ({kind.group}/{kind.version})", file=out, flush=True)
    for line in kind.ignored(job, runtime):
        print(f"[launcher] warning: {line}", file=out, flush=True)
    try:
        deadline_at = _claim_deadline(job, kind, namespace, timeout_s)
    except DeadlinePassed:
        _delete_job(calls, name, until=time.monotonic() + cleanup_s)  # a leftover of the earlier try
        raise
    owner = step_pod_owner(namespace)
    if owner is None and os.environ.get(OWNER_ENV[0]):
        print(f"[launcher] not setting an ownerReference: the step's pod is not in namespace {namespace} "
              f"(Kubernetes would garbage-collect the job at once); the run's cleanup step deletes it", file=out)
    manifest = kind.manifest(job, owner=owner, deadline=_iso(deadline_at), runtime=runtime)
    deadline = time.monotonic() + (deadline_at - time.time())
    follower = MasterLog(calls, name, poll_s=poll_s, tail_lines=tail_lines, until=deadline + cleanup_s, out=out)
    incidents = Incidents(out)
    failure, cause = None, ""
    delete = timed_out = False
    budget = cleanup_s
    with sigterm_raises():
        try:
            if time.monotonic() >= deadline:
                raise OutOfTime("the deadline had passed before this try started", None)
            deadline = _create_or_attach(calls, manifest, namespace, deadline, out)
            follower.until = deadline + cleanup_s
            follower.start()
            conditions = _wait(calls, name, namespace, deadline, poll_s, pending_timeout_s, incidents, out)
            if "Failed" in conditions:
                cond = conditions["Failed"]
                failure, cause = JobFailed, (f"{kind.kind} {namespace}/{name} failed: {cond.get('reason')}: "
                                             f"{cond.get('message')}")
        except OutOfTime as error:
            delete = timed_out = True
            failure, cause = JobTimeout, (
                f"{kind.kind} {namespace}/{name} did not finish by the step's deadline ({_iso(deadline_at)}, "
                f"{timeout_s:.0f}s after the step first started it; {error}): deleted it, and a retry of this step "
                f"will not start it again (marker {deadline_marker(job)}). Raise the step's timeout or check the "
                f"cluster.")
        except _Stuck as stuck:
            delete = True
            failure, cause = JobPending, (f"{kind.kind} {namespace}/{name} cannot run: {stuck}; deleted it. Free or "
                                          f"add the resources, fix the pod's spec, or raise pending_timeout_s.")
        except Terminated:
            # the step pod's grace period is short (30 s by default): act first, then save what logs remain
            budget = min(cleanup_s, TERMINATED_CLEANUP_S)
            if disruption := step_pod_disruption(calls, owner, until=time.monotonic() + budget / 4):
                failure, cause = StepEvicted, (  # a drain, not the user: the run goes on (components/launch_drain.py)
                    f"the step's pod was disrupted ({disruption}): left {kind.kind} {namespace}/{name} running; the "
                    f"retry of this step attaches to it")
                cause += release_job(calls, name, owner, until=time.monotonic() + budget / 4)
            else:
                failure, cause = StepTerminated, (
                    f"the step got SIGTERM (KFP Terminate, or its pod deleted): deleted {kind.kind} "
                    f"{namespace}/{name}, whose pods checkpoint on SIGTERM; a retry of this step starts it again and "
                    f"it resumes from the checkpoints in {job.checkpoint_uri}")
                cause += _delete_job(calls, name, until=time.monotonic() + budget / 2)
        except LaunchError:
            raise
        except Exception as error:
            if http_status(error) is None:
                raise  # not the API's answer: a bug, keep its traceback
            failure, cause = LaunchError, f"lost track of {kind.kind} {namespace}/{name}: {api_message(error)}"
        finally:
            until = time.monotonic() + budget
            follower.finish(timeout=budget / 2)
            log_uris = save_replica_logs(calls, job, follower, until=until) if follower.started else {}
            follower.close()
        if timed_out:
            _mark_deadline_passed(job)  # before deleting: a retry that starts now already sees it
        if delete:
            cause += _delete_job(calls, name, until=until)
    tail = follower.tail()
    if failure is not None:
        pods = f"\npods:{incidents}" if incidents.seen else ""
        logs = "".join(f"\n  {uri}" for uri in log_uris.values()) or " (none saved)"
        raise failure(f"{cause}{pods}\nlogs:{logs}\nlast {tail_lines} lines of the master's log:\n{tail}")
    print(f"[launcher] {kind.kind} {namespace}/{name} succeeded", file=out, flush=True)
    return LaunchResult(job=name, namespace=namespace, log_uris=log_uris, tail=tail)


def _create_or_attach(calls: Calls, manifest: dict, namespace: str, deadline: float, out) -> float:
    """Create the job, or attach to the one an earlier try created; return the (maybe earlier) deadline."""
    name = manifest["metadata"]["name"]
    try:
        calls.create_job(manifest, until=deadline)
        print(f"[launcher] created {calls.kind.kind} {namespace}/{name}", file=out, flush=True)
        return deadline
    except OutOfTime:
        raise
    except Exception as error:
        if http_status(error) != 409:
            raise LaunchError(_refused(calls.kind, manifest, namespace, error)) from error
    print(f"[launcher] {calls.kind.kind} {namespace}/{name} already exists (a retried step): attaching", file=out, flush=True)
    existing = calls.get_job(name, until=deadline)
    theirs = (existing["metadata"].get("annotations") or {}).get(DEADLINE_ANNOTATION)
    if theirs:
        deadline = min(deadline, time.monotonic() + (_epoch(theirs) - time.time()))
    for owner in manifest["metadata"].get("ownerReferences") or []:
        _add_owner(calls, existing, owner, deadline, out)
    return deadline


def _add_owner(calls: Calls, job: dict, owner: dict, deadline: float, out) -> None:
    """Make this try's pod an owner of the job too: the job then lives while any try's pod does."""
    name = job["metadata"]["name"]
    for _ in range(5):  # a conflicting writer (the operator updating the job) makes the patch stale: read again
        owners = job["metadata"].get("ownerReferences") or []
        if any(o.get("uid") == owner["uid"] for o in owners):
            return
        patch = {"metadata": {"ownerReferences": [*owners, owner],
                              "resourceVersion": job["metadata"]["resourceVersion"]}}
        try:
            calls.patch_job(name, patch, until=deadline)
            return
        except OutOfTime:
            raise
        except Exception as error:
            if http_status(error) != 409:
                print(f"[launcher] could not add this step's pod as an owner of {name} ({api_message(error)}; "
                      f"the Role needs 'patch' on {calls.kind.plural}): it stays owned by the earlier try's pod",
                      file=out, flush=True)
                return
        job = calls.get_job(name, until=deadline)


def job_kind(calls: Calls, job_api: str, *, until: float) -> JobKind:
    """The kind `job_api` names, checked against the API server's discovery ("auto": TrainJob if served, else
    PyTorchJob); a one-line `NoJobApi` when the cluster serves none of what was asked for."""
    try:
        return resolve(job_api, lambda kind: calls.served(kind, until=until))
    except NoJobApi:
        raise
    except Exception as error:
        if http_status(error) is None and not isinstance(error, OutOfTime):
            raise
        raise LaunchError(f"could not ask the API server which training-job APIs it serves: {describe(error)}; "
                          f"check the cluster, or set job_api=trainjob or pytorchjob") from error


def _refused(kind: JobKind, manifest: dict, namespace: str, error: BaseException) -> str:
    """One line for a job the API server refused (schema, admission, RBAC), saying what to do."""
    name = manifest["metadata"]["name"]
    text = f"the API server refused {kind.kind} {namespace}/{name}: {api_message(error)}"
    runtime = manifest["spec"].get("runtimeRef", {}).get("name")
    if runtime and runtime in text and "not found" in text.lower():
        return (f"{text}; install the runtime (kubectl apply -k of an overlay creates ClusterTrainingRuntime "
                f"{runtime}, k8s/steps/trainingruntime.yaml) or set the `runtime` parameter to one that exists")
    status = http_status(error)
    if status == 403:
        return f"{text}; bind the Role maskdit-pipeline to the step's service account (k8s/overlays, docs/operating.md)"
    return f"{text}; nothing was created: fix the pipeline parameter it names (components/cluster.py)"


def delete_run_jobs(run_id: str, api, namespace: str | None = None, *, call_timeout_s: float = 30.0,
                    budget_s: float = 300.0, job_api: str = "auto") -> list[str]:
    """Delete every training job labelled with pipeline run `run_id`, of each kind `job_api` allows that the
    cluster serves (retrying for `budget_s`); return their names."""
    calls = Calls(api, namespace or api.namespace, call_timeout_s=call_timeout_s)
    until = time.monotonic() + budget_s
    kinds = list(KINDS.values()) if job_api == "auto" else [resolve(job_api, lambda kind: True)]
    names = []
    for kind in kinds:
        if not calls.served(kind, until=until):
            continue
        kind_calls = calls.with_kind(kind)
        found = [i["metadata"]["name"] for i in kind_calls.list_jobs(f"{RUN_ID_LABEL}={label_value(run_id)}",
                                                                     until=until)]
        for name in found:
            try:
                kind_calls.delete_job(name, until=until)
            except Exception as error:
                if http_status(error) != 404:  # already gone is what we wanted
                    raise LaunchError(f"could not delete {kind.kind} {calls.namespace}/{name}: "
                                      f"{api_message(error)}") from error
        names += found
    return names


def launch(job: TrainJob, backend: Backend = "kubernetes", *, namespace: str | None = None,
           timeout_s: float = 86400.0, local_nproc: int = 1, api=None, poll_s: float | None = None,
           pending_timeout_s: float = 3600.0, call_timeout_s: float = 30.0, backoff_s: float = 1.0,
           cleanup_s: float = 120.0, tail_lines: int = 50, out=None, job_api: str = "auto",
           runtime: str = "maskdit") -> LaunchResult:
    """Run `job` on `backend`; return where its logs are and the master's last lines (raise on failure).

    job_api (kubernetes backend): "trainjob" (Kubeflow Trainer v2, on ClusterTrainingRuntime `runtime`),
    "pytorchjob" (Training Operator v1.9), or "auto" (whichever the cluster serves; TrainJob when both).
    poll_s: seconds between looks at the job (default: $MASKDIT_LAUNCH_POLL_S, else 15).
    """
    if backend == "kubernetes":
        poll_s = poll_interval() if poll_s is None else poll_s
        return launch_kubernetes(job, api or training_client(namespace), namespace, timeout_s, poll_s,
                                 pending_timeout_s=pending_timeout_s, call_timeout_s=call_timeout_s,
                                 backoff_s=backoff_s, cleanup_s=cleanup_s, tail_lines=tail_lines, out=out,
                                 job_api=job_api, runtime=runtime)
    if backend == "local":
        return launch_local(job, local_nproc, timeout_s, tail_lines, out)
    raise ValueError(f"backend={backend!r}: use 'kubernetes' (a TrainJob or PyTorchJob) or 'local' (torchrun here)")

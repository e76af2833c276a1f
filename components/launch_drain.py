"""SIGTERM to a pretrain/tune step: a node drain or KFP's Terminate, told apart, and the job kept for a drain.

Both end the step's pod with SIGTERM, but they mean opposite things for the 8-GPU training job it watches:
- KFP's Terminate (and deleting the run) deletes the pod through the API: the run is over, the job must go;
- a drain (`kubectl drain`, a node upgrade, the cluster autoscaler) evicts it through the Eviction API, and
  the scheduler's preemption, the taint manager and a graceful node shutdown end it too: the run goes on,
  KFP retries the step (retries=2), and the retry attaches to the job, which never stopped.
Kubernetes (1.26+; on by default since 1.31) marks every such disruption on the pod before it deletes it:
the condition `DisruptionTarget` (reason EvictionByEvictionAPI, PreemptionByScheduler, DeletionByTaintManager,
TerminationByKubelet, ...). An API delete never sets it. So the launcher reads its own pod on SIGTERM
(`pods get`, which the steps' Role grants): with the condition it leaves the job running and takes its pod off
the job's ownerReferences (else the garbage collector would delete the job with the evicted pod); without
it, it deletes the job as before. A run that ends without a retry still loses the job: the run's cleanup
step deletes every job labelled with the run.
"""

from __future__ import annotations

from components.kube_calls import Calls, api_message, http_status

DISRUPTION = "DisruptionTarget"


def step_pod_disruption(calls: Calls, owner: dict | None, *, until: float) -> str:
    """Why the step's own pod (`owner`, an ownerReference to it) is going: the DisruptionTarget condition's
    reason and message, or "" when it has none (an API delete: KFP Terminate) or cannot be read."""
    if owner is None:
        return ""
    try:
        pod = calls.get_pod(owner["name"], until=until)
    except Exception as error:  # unreadable: behave as before (delete), and say why
        print(f"[launcher] could not read this step's pod {owner['name']} ({api_message(error)}): treating "
              f"SIGTERM as KFP Terminate", file=calls.out, flush=True)
        return ""
    if pod.get("metadata", {}).get("uid") != owner["uid"]:
        return ""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == DISRUPTION and condition.get("status") == "True":
            return f"{condition.get('reason') or 'disrupted'}: {condition.get('message') or ''}".strip(": ")
    return ""


def release_job(calls: Calls, name: str, owner: dict, *, until: float) -> str:
    """Take the step's pod off the job's ownerReferences, so that the job outlives the evicted pod; '' when
    done (or the job is gone), else what went wrong and what that means."""
    for _ in range(5):  # a concurrent writer (the operator's status update) makes the patch stale: read again
        try:
            job = calls.get_job(name, until=until)
            owners = job["metadata"].get("ownerReferences") or []
            kept = [o for o in owners if o.get("uid") != owner["uid"]]
            if kept == owners:
                return ""
            calls.patch_job(name, {"metadata": {"ownerReferences": kept or None,
                                                "resourceVersion": job["metadata"]["resourceVersion"]}},
                            until=until)
            return ""
        except Exception as error:
            if http_status(error) == 404:
                return ""
            if http_status(error) != 409:
                return (f"; could NOT take this pod off its owners ({api_message(error)}): Kubernetes may delete the "
                        f"job with this pod, and the retry then starts it again from the checkpoints")
    return "; could NOT take this pod off its owners (the job kept changing)"

"""Where and how a training job runs: the one declaration of the cluster settings.

`ClusterSettings` lists every knob (image, node count, GPUs, requests and limits, /dev/shm, node
selector, tolerations, restarts, Kueue queue, priority, Pending timeout, local processes) with its
type, default and the sentence the KFP UI shows. Everything else reads it:
- the pipeline's flat parameters are generated from it (`with_cluster_parameters`), so the UI still
  shows one documented field per knob;
- the DAG's first step (components/settings.py) validates the values and hands the training steps
  one `cluster` dict instead of 17 parameters each;
- the launcher builds the job from it (`TrainJob.from_settings`, components/pytorchjob.py).
Adding a knob: a field here, and the same name in the `settings` component's signature
(tests/test_pipeline_compile.py checks that the two agree).
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Literal

from pydantic import Field

from components import IMAGE
from maskdit.core.config import StrictModel

S3_SECRET = "maskdit-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
MLFLOW_SECRET = "maskdit-mlflow"  # the pipeline's own non-admin MLflow account: MLFLOW_TRACKING_USERNAME / _PASSWORD
CONFIG_MAP = "maskdit-config"  # MLFLOW_TRACKING_URI (k8s/base/kustomization.yaml)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the label NVIDIA's GPU feature discovery sets
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


class ClusterSettings(StrictModel):
    """The training jobs' placement and size (defaults fit a 96-vCPU / 680 GB 8xA100 node)."""

    image: str = Field(IMAGE, description="Container image of the training job's pods.")
    backend: Literal["kubernetes", "local"] = Field(
        "kubernetes", description='"kubernetes" (a training job per training step) or "local" (torchrun in the step '
        "itself).")
    job_api: Literal["auto", "trainjob", "pytorchjob"] = Field(
        "auto", description='Kind of training job: "trainjob" (Kubeflow Trainer v2), "pytorchjob" (Training Operator '
        'v1.9) or "auto" (whichever the cluster serves; TrainJob when both).')
    runtime: str = Field("maskdit", min_length=1, description="ClusterTrainingRuntime a TrainJob runs on "
                         "(k8s/steps/trainingruntime.yaml).")
    namespace: str = Field("", description="Namespace for the training jobs; empty = the pipeline's own.")
    nodes: int = Field(1, ge=1, description="Nodes per training job (one torchrun each).")
    gpus_per_node: int = Field(8, ge=0, description="GPUs per node (= processes per node); 0 = one CPU process per "
                               "node.")
    cpu_request: str = Field("80", description="CPU request of each training pod (defaults fit a 96-vCPU / 680 GB "
                             "8xA100 node).")
    cpu_limit: str = Field("90", description='CPU limit of each training pod ("" = none).')
    memory_request: str = Field("480Gi", description="Memory request of each training pod.")
    memory_limit: str = Field("580Gi", description="Memory limit of each training pod (the memory-backed /dev/shm "
                              "counts against it).")
    shm_size: str = Field("64Gi", description="Size of /dev/shm (a memory-backed emptyDir) for data-loader workers "
                          "and NCCL.")
    node_selector: dict[str, str] = Field(default_factory=lambda: dict(GPU_NODE_SELECTOR),
                                          description="Node labels the training pods must match.")
    tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [dict(t) for t in GPU_TOLERATIONS],
                                              description="Tolerations of the training pods (for tainted GPU nodes).")
    backoff_limit: int = Field(3, ge=0, description="Restarts of a PyTorchJob (preemption, retryable exit codes) "
                               "before it fails; user errors never restart. A TrainJob restarts as its runtime "
                               "says (failurePolicy.maxRestarts, 3): another value here is a warning.")
    queue_name: str = Field("", description='Kueue LocalQueue that admits the training jobs ("" = no Kueue).')
    priority_class_name: str = Field("", description='PriorityClass of the training pods ("" = the cluster\'s '
                                     "default).")
    pending_timeout_hours: float = Field(1.0, gt=0, description="Fail (with the scheduler's reason) when a training "
                                         "pod stays Pending this long.")
    local_nproc: int = Field(1, ge=1, description="Processes for the local backend's torchrun.")
    grace_period_s: float = Field(300.0, gt=0, description="Seconds a training pod has from SIGTERM (preemption, "
                                  "drain) to write its checkpoint and exit: checkpoint.grace_period_s, and the "
                                  "pods' terminationGracePeriodSeconds this plus 30 (an XL/2 checkpoint takes "
                                  "minutes; training warns when one took longer).")


def _kfp_type(annotation: Any) -> type:
    """The plain type KFP takes for a pipeline parameter (dict[str, str] -> dict, Literal[...] of str -> str)."""
    annotation = typing.get_origin(annotation) or annotation
    if annotation is Literal:
        return str
    return annotation


def cluster_parameters() -> list[inspect.Parameter]:
    """The settings as keyword parameters of a function (name, plain type, default)."""
    defaults = ClusterSettings()
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, name),
                              annotation=_kfp_type(field.annotation))
            for name, field in ClusterSettings.model_fields.items()]


def cluster_docs() -> str:
    """The settings' lines for a Google-style `Args:` section."""
    return "".join(f"        {name}: {field.description}\n" for name, field in ClusterSettings.model_fields.items())


def with_cluster_parameters(func):
    """Give a pipeline function the settings as flat parameters (after its own), documented from the fields.

    `func` takes its own parameters and `cluster`: a dict of the settings' values (KFP channels at compile
    time). KFP reads the signature and the docstring; its `Args:` section must end the docstring.
    """
    own = list(inspect.signature(func).parameters.values())
    if not own or own[-1].name != "cluster":
        raise TypeError(f"{func.__name__} must take `cluster` as its last parameter")
    own = own[:-1]
    added = cluster_parameters()
    signature = inspect.Signature([p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own + added])
    names = {p.name for p in added}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        cluster = {name: values.pop(name) for name in list(values) if name in names}
        return func(**values, cluster=cluster)

    wrapper.__signature__ = signature
    del wrapper.__wrapped__  # KFP must see the generated signature, not the wrapped function's
    wrapper.__doc__ = (func.__doc__ or "").rstrip() + "\n" + cluster_docs()
    return wrapper

"""The evaluate step: samples and FID of the tuned model (`maskdit evaluate`, in its pod or as a job), shown in KFP."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], dataset: Input[Dataset], ref_stats: str, num_samples: int, sampler: dict,
             gpus: int, store_uri: str, kfp_run_id: str, kfp_run_name: str, experiment: str, as_job: bool,
             cluster: dict, timeout_hours: float, metrics: Output[Metrics], samples: Output[HTML],
             evaluation: Output[Artifact]) -> float:
    """FID of `num_samples` EDM-Heun samples (settings `sampler`: SamplerConfig fields) against `ref_stats`.

    ref_stats: reference statistics (.npz with mu, sigma); empty = the dataset's own statistics
    (`maskdit fid-stats`). Writes <store_uri>/runs/<run id>/evaluate (result.json, grid.png); logs FID
    to KFP (Metrics) and the sample grid (HTML), and to MLflow. Returns the FID (the output `Output`:
    KFP's local runner resolves conditions only on that name). gpus: the GPUs this pod was given (0: CPU).
    as_job: sample and score as a job on the cluster's GPUs (`cluster`: the settings step's output; local
    backend: torchrun with local_nproc processes), deleted after `timeout_hours`; false: in this pod.
    """
    from components.steps import evaluate_step, job_plan, pointed

    result = evaluate_step(pointed(model), pointed(dataset), ref_stats, num_samples, sampler, "cuda" if gpus else "cpu",
                           store_uri, kfp_run_id, kfp_run_name, experiment, metrics, samples, evaluation,
                           job_plan(as_job, cluster, timeout_hours))
    return result.fid

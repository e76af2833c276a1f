"""Encode and evaluate as jobs, like training: their `maskdit` command launched on the cluster's
GPUs (a PyTorchJob, or torchrun with `local_nproc` processes here), their result.json read back.

The step's pod stays a thin client: it builds the command, calls `launch` (components/launcher.py:
the same deadline, logs, Terminate, retries and Pod Security settings as training) and reads the
typed result the job's rank 0 wrote. `maskdit encode` splits whole shards over the ranks and
`maskdit evaluate` whole sample batches, so the output is the same for any number of processes.
"""

from __future__ import annotations

import json

from components.cluster import CONFIG_MAP, MLFLOW_SECRET, S3_SECRET, ClusterSettings


def override_args(values: dict) -> list[str]:
    """`key=value` arguments of a `maskdit` command: a string as typed (a string field takes an override's
    text as it is, maskdit/core/config.py), anything else as JSON (which the CLI reads as YAML 1.2)."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]


def step_job(stage: str, command: list[str], settings: ClusterSettings, run_id: str, job_dir: str,
             env: dict[str, str]):
    """The `TrainJob` that runs `command` for `stage`, placed like training (its deadline marker and logs under
    `job_dir`; `run_id` names it, so a retried step attaches to it)."""
    from components.pytorchjob import TrainJob

    return TrainJob.from_settings(settings, step=stage, run_id=run_id, command=command, checkpoint_uri=job_dir,
                                  env=env, secrets=[S3_SECRET, MLFLOW_SECRET], config_maps=[CONFIG_MAP])


def run_job(stage: str, command: list[str], cluster: dict | ClusterSettings, run_id: str, job_dir: str,
            env: dict[str, str], timeout_hours: float):
    """Launch `command` as `stage`'s job (`step_job`) and wait for it; the LaunchResult (raises on failure)."""
    from components.launcher import launch

    settings = cluster if isinstance(cluster, ClusterSettings) else ClusterSettings(**cluster)
    job = step_job(stage, command, settings, run_id, job_dir, env)
    print(f"[{stage}] as a job: {' '.join(command)}", flush=True)
    return launch(job, settings.backend, namespace=settings.namespace or None, timeout_s=timeout_hours * 3600,
                  pending_timeout_s=settings.pending_timeout_hours * 3600, local_nproc=settings.local_nproc,
                  job_api=settings.job_api, runtime=settings.runtime)


def encode_command(images: str, out: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool,
                   dataset_id: str) -> list[str]:
    """`maskdit encode` of the step's inputs (each rank takes the GPU of its local rank, else the CPU)."""
    return ["maskdit", "encode", *override_args(dict(input=images, out=out, resolution=resolution, vae=vae,
                                                     pixel_space=pixel_space, grayscale=grayscale,
                                                     dataset_id=dataset_id, progress=False))]


def evaluate_command(checkpoint: str, dataset: str, ref_stats: str, out: str, num_samples: int,
                     sampler: dict) -> list[str]:
    """`maskdit evaluate` of the step's inputs (device auto: each rank's GPU, else the CPU)."""
    return ["maskdit", "evaluate", *override_args(dict(checkpoint=checkpoint, dataset=dataset, ref_stats=ref_stats,
                                                       out=out, num_samples=num_samples, sampler=sampler))]


def check_evaluation(result, num_samples: int, sampler) -> None:
    """Refuse a result.json that is not the evaluation this step asked for (an earlier run's, other settings):
    only a complete evaluation of these settings may reach the FID gate."""
    from maskdit.evaluation.evaluate import EvalError

    asked = {"num_samples": num_samples, "sampler": sampler.model_dump()}
    found = {"num_samples": result.num_samples, "sampler": result.sampler.model_dump()}
    wrong = [key for key in asked if asked[key] != found[key]]
    if wrong:
        raise EvalError(f"the evaluation job's result.json does not match what this step asked for ({', '.join(wrong)}: "
                        f"asked {[asked[k] for k in wrong]}, found {[found[k] for k in wrong]}): delete it and retry "
                        f"the step")

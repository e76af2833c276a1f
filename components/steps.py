"""What the KFP components run: each step calls its `maskdit` step's `run(config)` and shows the result.

The component functions (components/<step>.py) only forward their inputs here, so the logic is
plain Python that tests import directly. Pretrain and tune run `maskdit train` as a training job (TrainJob or
PyTorchJob; torchrun locally); encode and evaluate run `maskdit encode` / `maskdit evaluate` the same way when
given a `job` plan (components/stepjobs.py), else in the component's own pod; register runs in its
pod. A job's result comes back as `result.json` from object storage, never from a log.

A step's artifacts are small pointers: the data and the checkpoints stay in object storage
(`store_uri`), and each artifact records the URI in its metadata (`uri`) and in its file (JSON),
so KFP never copies gigabytes between steps.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from pydantic import Field

from components.cluster import CONFIG_MAP, MLFLOW_SECRET, S3_SECRET, ClusterSettings
from maskdit.core.config import StrictModel
from maskdit.core.parent_run import close_stale_runs as close_stale_children
from maskdit.core.parent_run import find_or_create_parent, finish_parents, parent_env
from maskdit.core.tracking_server import environment

KFP_RUN_TAG = "kfp.run_id"


class StepError(RuntimeError):
    """A pipeline step got inputs it cannot use (an artifact that points nowhere)."""


# --- artifacts as pointers ---

def point(artifact, uri: str, **metadata) -> None:
    """Make `artifact` point at `uri` (metadata + a small JSON file at artifact.path)."""
    artifact.metadata.update({"uri": uri, **metadata})
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri, **metadata}, indent=1))


def pointed(artifact) -> str:
    """The URI an upstream step's artifact points at."""
    uri = artifact.metadata.get("uri")
    if not uri and Path(artifact.path).exists():
        uri = json.loads(Path(artifact.path).read_text()).get("uri")
    if not uri:
        raise StepError(f"artifact {artifact.name!r} at {artifact.path} carries no 'uri': was it written by maskdit?")
    return uri


def run_dir(store_uri: str, kfp_run_id: str) -> str:
    """`<store>/runs/<run id>`: every output of one pipeline run (checkpoints, evaluation, logs)."""
    from components.pytorchjob import label_value

    return f"{store_uri.rstrip('/')}/runs/{label_value(kfp_run_id)}"


# --- MLflow: one parent run per pipeline run (the KFP names for maskdit.core.parent_run) ---

def parent_run(kfp_run_id: str, kfp_run_name: str, experiment: str) -> str | None:
    """The MLflow parent run of this pipeline run (found by its `kfp.run_id` tag, else created).

    None when no tracking URI is configured (MLFLOW_TRACKING_URI). Steps pass the id to their
    work as MASKDIT_PARENT_RUN_ID, which nests the step's own run under it.
    """
    return find_or_create_parent(experiment, KFP_RUN_TAG, kfp_run_id, kfp_run_name or f"kfp-{kfp_run_id}",
                                 {"kfp.run_name": kfp_run_name, "maskdit.pipeline": "true"})


def finish_parent_run(kfp_run_id: str, experiment: str, state: str, error: str = "") -> None:
    """Close the pipeline run's MLflow parent run: FINISHED when KFP says SUCCEEDED, else FAILED."""
    tags = {"kfp.state": state, **({"kfp.error": error[:5000]} if error else {})}
    status = "FINISHED" if state == "SUCCEEDED" else "FAILED"
    for run_id in finish_parents(experiment, KFP_RUN_TAG, kfp_run_id, status, tags):
        print(f"MLflow parent run {run_id}: {state}")


def step_env(kfp_run_id: str, kfp_run_name: str, experiment: str) -> dict[str, str]:
    """Environment for a step's work: nest its MLflow run under the pipeline run's parent run."""
    return parent_env(parent_run(kfp_run_id, kfp_run_name, experiment))


# --- the steps ---

def _encode_config(images: str, out: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool,
                   device: str):
    from maskdit.data.encode import EncodeConfig

    return EncodeConfig(input=images, out=out, resolution=resolution, vae=vae, pixel_space=pixel_space,
                        grayscale=grayscale, device=device)


def fingerprint_step(images: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool) -> str:
    """The identity (sha256) of the dataset encode would make, from a listing of `images`: the encode
    step's cache key, so that new images at the same URI are encoded and unchanged ones are not."""
    from maskdit.data.encode import fingerprint

    identity = fingerprint(_encode_config(images, "", resolution, vae, pixel_space, grayscale, "cpu"))
    print(f"dataset {identity.name}: {identity.files} files, {identity.bytes} bytes, sha256 {identity.digest}")
    return identity.digest


def encode_step(images: str, store_uri: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool,
                device: str, dataset, dataset_id: str = "", job: dict | None = None):
    """`maskdit encode` into `<store>/datasets/<name>-<identity[:12]>`; 'mnist' = the bundled digits.

    The folder is named by the dataset's identity (maskdit.data.identity), so an unchanged source finds
    the dataset it already made (nothing is encoded) and a changed one gets a new folder. With
    `dataset_id` (the fingerprint step's output, the step's cache key) a source that changed since
    then is an error: the cache entry would describe other data. With `job` (`JobPlan` fields) the
    encode runs as a job on the cluster's GPUs (components/stepjobs.py) unless the dataset is there.
    """
    from maskdit.core.result import read_result, result_uri
    from maskdit.data.encode import EncodeResult, fingerprint, reusable, run
    from maskdit.data.imagefolders import EncodeError

    identity = fingerprint(_encode_config(images, "", resolution, vae, pixel_space, grayscale, device))
    if dataset_id and identity.digest != dataset_id:
        raise EncodeError(f"the images at {images} changed after the fingerprint step listed them (identity "
                          f"{dataset_id[:12]}, now {identity.digest[:12]}): re-run the pipeline")
    out = f"{store_uri.rstrip('/')}/datasets/{identity.name}"
    cfg = _encode_config(images, out, resolution, vae, pixel_space, grayscale, device)
    cfg = cfg.model_copy(update={"dataset_id": identity.digest})  # the folder must hold what it is named by
    if job and not reusable(out, identity):
        from components.stepjobs import encode_command, run_job

        plan = JobPlan(**job)  # named by the dataset, not the run: the step stays cached on the data's identity
        run_job("encode", encode_command(images, out, resolution, vae, pixel_space, grayscale, identity.digest),
                plan.cluster, identity.digest, f"{out}/job", {}, plan.timeout_hours)
        result = read_result(EncodeResult, result_uri(out))
    else:
        result = run(cfg)
    print(f"dataset {out}: {'re-used, nothing encoded' if result.reused else 'encoded'} "
          f"({result.count} samples, identity {result.dataset_id})")
    point(dataset, result.dataset, manifest=result.manifest, source=images, resolution=resolution,
          count=result.count, num_classes=result.num_classes, dataset_id=result.dataset_id, reused=result.reused)
    return result


class JobPlan(StrictModel):
    """How the encode or evaluate step runs its work as a job (components/stepjobs.py)."""

    cluster: ClusterSettings  # the settings step's output: placement, backend, local_nproc
    timeout_hours: float = Field(gt=0, description="delete the job and fail after this long")


def job_plan(as_job: bool, cluster: dict, timeout_hours: float) -> dict | None:
    """The `job` argument of encode_step / evaluate_step: None = in-process."""
    return JobPlan(cluster=cluster, timeout_hours=timeout_hours).model_dump() if as_job else None


def cluster_settings(values: dict) -> dict:
    """The pipeline's cluster parameters, checked (`ClusterSettings`), as the dict the training steps take."""
    from components.cluster import ClusterSettings
    from maskdit.core.config import build_config

    return build_config(ClusterSettings, dict(values), source="the pipeline's parameters").model_dump()


class TrainStep(StrictModel):
    """Everything a pretrain or tune step needs: what to train, and where and how to run it."""

    stage: str = Field(description="pretrain or tune: names the job and the checkpoint folder")
    config: str  # `maskdit train` preset or YAML
    overrides: list[str] = []
    dataset: str  # dataset URI
    init_from: str = ""  # checkpoint or models:/ URI to start from (tune: the pretrained model)
    resume_from: str = ""  # another run's checkpoint folder to continue (a failed run's pretraining)
    store_uri: str
    kfp_run_id: str
    kfp_run_name: str = ""
    experiment: str
    timeout_hours: float
    cluster: ClusterSettings  # where and how the job runs (components/cluster.py)

    @property
    def checkpoint_dir(self) -> str:
        return f"{run_dir(self.store_uri, self.kfp_run_id)}/{self.stage}"


def train_step(step: TrainStep):
    """`maskdit train` as a training job (or torchrun here): (its result.json, the MLflow parent run id, log URIs)."""
    from components.launcher import launch
    from components.parameters import check_overrides
    from components.pytorchjob import TrainJob
    from maskdit.core.result import read_result, result_uri
    from maskdit.train.loop import TrainResult

    overrides = check_overrides(f"{step.stage}_overrides", list(step.overrides), step.stage)
    # after `--` every item is a key=value override, never an option (--config, --help)
    command = ["maskdit", "train", "--config", step.config, "--", f"data.uri={step.dataset}",
               f"checkpoint.dir={step.checkpoint_dir}"]
    command += [f"init_from={step.init_from}"] if step.init_from else []
    command += [f"checkpoint.resume_from={step.resume_from}"] if step.resume_from else []
    command += overrides
    # the pods' terminationGracePeriodSeconds is built from the same setting (components/pytorchjob.py)
    command += [f"checkpoint.grace_period_s={step.cluster.grace_period_s:g}"]
    env = step_env(step.kfp_run_id, step.kfp_run_name, step.experiment)
    cluster = step.cluster
    job = TrainJob.from_settings(cluster, step=step.stage, run_id=step.kfp_run_id, command=command,
                                 checkpoint_uri=step.checkpoint_dir, env=env, secrets=[S3_SECRET, MLFLOW_SECRET],
                                 config_maps=[CONFIG_MAP])
    launched = launch(job, cluster.backend, namespace=cluster.namespace or None, timeout_s=step.timeout_hours * 3600,
                      pending_timeout_s=cluster.pending_timeout_hours * 3600, local_nproc=cluster.local_nproc,
                      job_api=cluster.job_api, runtime=cluster.runtime)
    result = read_result(TrainResult, result_uri(step.checkpoint_dir), within=step.checkpoint_dir)
    if result.checkpoint is None:
        raise StepError(f"the {step.stage} job finished without a checkpoint (steps={result.step}): set steps > 0")
    return result, env.get("MASKDIT_PARENT_RUN_ID", ""), launched.log_uris


def skip_pretraining(pretrained: str, unused: dict[str, str], model, metrics, card) -> None:
    """No pretraining in this run (`tune_init_from`): the Model artifact points at `pretrained` (a checkpoint
    or models:/ URI), which tuning starts from; `unused` are the pretraining parameters that must be empty."""
    set_ = [f"{name}={value!r}" for name, value in unused.items() if value]
    if set_:
        raise StepError(f"tune_init_from={pretrained!r} skips pretraining, so {', '.join(set_)} would be ignored: "
                        "leave them empty, or leave tune_init_from empty to pretrain")
    point(model, pretrained, stage="pretrain", skipped=True)
    metrics.log_metric("steps", 0.0)
    Path(card.path).write_text(f"# Pretraining skipped\n\nTuning starts from `{pretrained}` (tune_init_from).\n")
    print(f"pretraining skipped: tuning starts from {pretrained} (tune_init_from)")


def show_training(result, metrics, card=None, title: str = "MaskDiT training") -> None:
    """The training result in the KFP UI: a Metrics artifact (steps, skipped steps, wall time, the last
    logged loss, img/s and quick FID) and, with `card`, a Markdown card (`training_card`)."""
    metrics.log_metric("steps", float(result.step))
    metrics.log_metric("skipped_steps", float(result.skipped_steps))
    metrics.log_metric("wall_time_s", float(result.seconds))
    for key in ("loss", "dsm", "mae", "img_per_s"):
        if key in result.metrics:
            metrics.log_metric(key, float(result.metrics[key]))
    if result.fid_quick is not None:
        metrics.log_metric("fid_quick", float(result.fid_quick))
    if card is not None:
        Path(card.path).parent.mkdir(parents=True, exist_ok=True)
        Path(card.path).write_text(training_card(result, title))


def mlflow_run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI's page of a run (`<server>/#/experiments/<id>/runs/<id>`); None when not tracked."""
    if not (tracking_uri and run_id and experiment_id) or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def training_card(result, title: str) -> str:
    """Markdown for the KFP UI: the MLflow run (link and ids), the numbers, and the last sample grid (embedded PNG)."""
    from maskdit.core import storage

    link = mlflow_run_link(result.tracking_uri, result.experiment_id, result.run_id)
    run = f"[{result.run_id}]({link})" if link else (f"`{result.run_id}`" if result.run_id else "not tracked")
    rows = {"MLflow run": run, "MLflow server": f"`{result.tracking_uri or '-'}`",
            "experiment id": f"`{result.experiment_id or '-'}`", "steps": result.step,
            "loss": f"{result.metrics['loss']:.4f}" if "loss" in result.metrics else "-",
            "img/s": f"{result.metrics['img_per_s']:.1f}" if "img_per_s" in result.metrics else "-",
            "quick FID": f"{result.fid_quick:.3f}" if result.fid_quick is not None else "-",
            "skipped steps": result.skipped_steps, "wall time": f"{result.seconds:.0f} s",
            "checkpoint": f"`{result.checkpoint}`"}
    text = f"## {title}\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items())
    if result.grid:
        data = base64.b64encode(storage.get_bytes(result.grid)).decode()
        text += (f"\n### Samples of the EMA weights at step {result.step}\n\n"
                 f"![samples at step {result.step}](data:image/png;base64,{data})\n\n`{result.grid}`\n")
    return text


def grid_html(png: bytes, title: str, rows: dict[str, object]) -> str:
    """A self-contained HTML page: a table of `rows` and the sample grid embedded as base64 PNG."""
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    data = base64.b64encode(png).decode()
    return (f"<html><body><h2>{html.escape(title)}</h2><table>{table}</table>"
            f'<img alt="samples" style="image-rendering: pixelated; width: 100%; max-width: 768px" '
            f'src="data:image/png;base64,{data}"/></body></html>')


def cleanup_step(kfp_run_id: str, backend: str, namespace: str, api=None) -> list[str]:
    """Delete the run's training jobs, of each kind the cluster serves (kubernetes backend); the local
    backend leaves nothing behind. `api`: a TrainingClient (default: the cluster's)."""
    if backend != "kubernetes":
        print(f"backend {backend!r}: no training jobs to clean up")
        return []
    from components.launcher import delete_run_jobs, training_client

    deleted = delete_run_jobs(kfp_run_id, api or training_client(namespace or None), namespace or None)
    print(f"deleted training jobs of run {kfp_run_id}: {deleted or 'none'}")
    return deleted


def close_stale_runs(kfp_run_id: str, experiment: str, reason: str, step: str | None = None) -> list[str]:
    """Mark the pipeline run's MLflow child runs that a killed process left RUNNING as KILLED (and say why).

    Called where no such process can still be alive: by the evaluate step for the training runs
    (training is over), and by the exit step for every run (the jobs are deleted).
    """
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return []
    closed = close_stale_children(parent_run(kfp_run_id, "", experiment), reason, step=step)
    if closed:
        print(f"MLflow runs left RUNNING by killed processes, now KILLED: {', '.join(closed)}")
    return closed


def close_pipeline_run(kfp_run_id: str, experiment: str, state: str, error: str = "",
                       close_stale: bool = True) -> None:
    """The exit step's MLflow part: close the child runs killed processes left RUNNING (when `close_stale`: the
    run's jobs are gone), then the parent run as KFP's `state` says.

    MLflow is waited for once, within the retry budget (MASKDIT_RETRY_BUDGET_S): when it stays down,
    this is one line and exit 143 after one budget, not one budget for each of the two closings.
    """
    from maskdit.core.tracking_server import check_reachable, tracking_uri

    uri = tracking_uri()
    if uri is None:
        return
    check_reachable(uri)
    try:
        if close_stale:
            close_stale_runs(kfp_run_id, experiment, f"the pipeline run ended ({state}) while its process was gone "
                             "without closing it (SIGKILL, OOM or a lost node)")
    finally:
        finish_parent_run(kfp_run_id, experiment, state, error)


def evaluate_step(checkpoint_uri: str, dataset_uri: str, ref_stats: str, num_samples: int, sampler: dict,
                  device: str, store_uri: str, kfp_run_id: str, kfp_run_name: str, experiment: str, metrics, samples,
                  evaluation, job: dict | None = None):
    """`maskdit evaluate` into `<run dir>/evaluate` (FID + grid); shown in KFP. Empty ref_stats = the dataset's own.
    With `job` (`JobPlan` fields) the sampling and Inception run as a job on the cluster's GPUs
    (components/stepjobs.py) and this step reads its result.json."""
    from maskdit.core import storage
    from maskdit.core.result import read_result, result_uri
    from maskdit.evaluation import fid
    from maskdit.evaluation.evaluate import EvaluateConfig, EvaluateResult, run
    from maskdit.method.diffusion import SamplerConfig

    out = f"{run_dir(store_uri, kfp_run_id)}/evaluate"
    close_stale_runs(kfp_run_id, experiment, "training finished; this attempt's process ended without closing it "
                     "(SIGKILL, OOM or a lost node)", step="train")
    env = step_env(kfp_run_id, kfp_run_name, experiment)
    with environment(env):
        if not ref_stats:
            ref_stats = fid.run(fid.FIDStatsConfig(source=dataset_uri, out=f"{out}/ref_stats.npz",
                                                   device=device)).stats
        settings = SamplerConfig(**sampler)  # a bad key fails here, in seconds, not in the job
        if job:
            from components.stepjobs import check_evaluation, evaluate_command, run_job

            plan = JobPlan(**job)
            run_job("evaluate", evaluate_command(checkpoint_uri, dataset_uri, ref_stats, out, num_samples, sampler),
                    plan.cluster, kfp_run_id, out, env, plan.timeout_hours)
            result = read_result(EvaluateResult, result_uri(out))
            check_evaluation(result, num_samples, settings)
        else:
            result = run(EvaluateConfig(checkpoint=checkpoint_uri, dataset=dataset_uri, ref_stats=ref_stats, out=out,
                                        num_samples=num_samples, sampler=settings, device=device))
    for key, value in (("fid", result.fid), ("cfg_scale", result.sampler.cfg_scale),
                       ("num_steps", result.sampler.num_steps), ("num_samples", result.num_samples),
                       ("precision", result.precision), ("recall", result.recall), ("accuracy", result.accuracy)):
        if value is not None:
            metrics.log_metric(key, float(value))
    Path(samples.path).parent.mkdir(parents=True, exist_ok=True)
    Path(samples.path).write_text(grid_html(storage.get_bytes(result.grid), "MaskDiT samples", {
        "FID": f"{result.fid:.3f}",
        **({} if result.accuracy is None else {"class accuracy": f"{result.accuracy:.1%} ({result.classifier}: "
                                                                 f"{result.classifier_accuracy:.1%} on real digits)"}),
        "samples": result.num_samples, "CFG scale": result.sampler.cfg_scale,
        "sampler steps": result.sampler.num_steps, "reference": result.ref_stats, "checkpoint": result.checkpoint,
        "evaluation": out, "MLflow parent run": os.environ.get("MASKDIT_PARENT_RUN_ID", "-")}))
    point(evaluation, out, fid=result.fid)
    return result


def register_step(evaluation_uri: str, dataset_uri: str, model_name: str, kfp_run_id: str, kfp_run_name: str,
                  experiment: str, report):
    """`maskdit register` of what the evaluation scored: a new version (alias candidate), champion when best."""
    from maskdit.registry.register import RegisterConfig, run

    with environment(step_env(kfp_run_id, kfp_run_name, experiment)):
        result = run(RegisterConfig(evaluation=evaluation_uri, name=model_name, dataset=dataset_uri,
                                    kfp_run_id=kfp_run_id))
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(
        f"## {result.name} version {result.version}\n\n"
        f"| | |\n|---|---|\n| FID | {result.fid:.3f} |\n| aliases | {', '.join(result.aliases)} |\n"
        f"| champion before | {result.previous_champion or '-'} "
        f"(FID {result.previous_champion_fid if result.previous_champion_fid is not None else '-'}) |\n"
        f"| not champion because | {result.reason or '-'} |\n"
        f"| model URI | `{result.model_uri}` |\n| MLflow run | `{result.run_id}` |\n")
    return result

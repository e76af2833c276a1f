"""The MLflow Model Registry: a trained MaskDiT as a pyfunc model, with `candidate` / `champion` aliases.

The step is `run(RegisterConfig) -> RegisterResult`: it reads the evaluate step's result (FID,
sampler settings, reference statistics, checkpoint) and calls `register(...)`, which logs a pyfunc
model whose artifacts are the EMA weights alone as bfloat16 safetensors (`maskdit.method.weights.save_ema`),
the dataset manifest and, for a latent model, the VAE, with the sha256 of each file in the model's
metadata (every load checks them, `maskdit.method.modelformat`); with it go the maskdit code and pinned requirements
(`maskdit.registry.bundle`), so a fresh environment loads and serves it. The model is logged in the run
that trained the checkpoint (its `tracking_run_id`, the tune run), so that run is the version's
source; a checkpoint trained without tracking gets a `register-<name>` run instead. The version
gets tags (fid, sampler settings, evaluation settings, dataset manifest, checkpoint URI, training
and evaluate run ids, KFP run id), the evaluation's metrics on the logged model, a model card as
its description (`bundle.model_card`), and the alias `candidate`.

The champion gate and its lock are maskdit/registry/champion.py; the model class MLflow loads,
with what `predict` takes and returns, is maskdit/registry/pyfunc.py.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd

from maskdit.core import storage
from maskdit.core.config import StrictModel
from maskdit.core.result import RESULT_FILE, StepResult, read_result, result_uri
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.evaluation.fid import FID
from maskdit.method.diffusion import SamplerConfig
from maskdit.method.modelformat import (
    DIGESTS,
    MANIFEST_ARTIFACT,
    MODEL_FORMAT,
    VAE_ARTIFACT,
    WEIGHTS_ARTIFACT,
)
from maskdit.registry.bundle import copy_code, model_card, requirements, save_vae
from maskdit.registry.champion import CANDIDATE, FID_TAG, RegistryError, promote
from maskdit.registry.pyfunc import (  # also a name older versions pickled (pyfunc.py)
    SIGNATURE,
    MaskDiTModel,
)

log = logging.getLogger(__name__)


class RegisterConfig(StrictModel):
    """`maskdit register`: the evaluated checkpoint as a new model version, champion when its FID is best."""

    evaluation: str  # the evaluate step's out folder (or its result.json): FID, sampler, checkpoint, dataset
    name: str  # registered model name
    dataset: str | None = None  # the dataset whose manifest names the VAE; None: the evaluation's
    kfp_run_id: str | None = None  # the Kubeflow run that produced the model (a tag)
    tracking_uri: str | None = None  # MLflow; None: env MLFLOW_TRACKING_URI (which wins when set)
    experiment: str = "maskdit"  # experiment of the registration run when it has no parent run
    out: str | None = None  # folder for result.json; None: <evaluation>/register


class RegisterResult(StepResult):
    kind: Literal["register"] = "register"
    name: str
    version: str
    champion: bool  # did this version become the champion
    aliases: list[str]
    previous_champion: str | None  # version that was champion before, if any
    previous_champion_fid: float | None  # as recorded (a version registered before the FID check may hold NaN)
    run_id: str
    model_uri: str  # models:/<name>/<version>
    fid: FID
    reason: str | None = None  # why this version did not become the champion (None when it did)


def _export(checkpoint_uri: str, dest: Path) -> tuple[str, dict]:
    """The registered weights of a training checkpoint: its EMA alone, bfloat16 safetensors at `dest`; returns
    (its URI, what it says besides weights: model_config, step, train_config, tracking_run_id)."""
    from maskdit.method.checkpoint import resolve
    from maskdit.method.weights import save_ema

    uri, state = resolve(checkpoint_uri)  # checked: config against tensors, finite (maskdit.method.weights)
    save_ema(dest, state["ema"], model_config=state["model_config"], step=state["step"],
             train_config=state.get("train_config"))
    info = {k: state.get(k) for k in ("model_config", "step", "train_config", "tracking_run_id")}
    return uri, info


def _digests(artifacts: dict[str, str]) -> dict[str, object]:
    """{artifact name: sha256 of the file, or {file in the folder: sha256}}: the model's metadata records them."""
    from maskdit.method.weights import sha256_file

    found: dict[str, object] = {}
    for name, path in artifacts.items():
        local = Path(path)
        found[name] = (sha256_file(local) if local.is_file() else
                       {str(f.relative_to(local)): sha256_file(f) for f in sorted(local.rglob("*")) if f.is_file()})
    return found


def _manifest(dataset_uri: str | None, train_config: dict, dest: Path):
    """(dataset URI, Manifest, sha256 of its manifest.json) of the dataset, its manifest copied to `dest`."""
    from maskdit.data.shards import manifest_sha256, read_manifest

    dataset_uri = dataset_uri or (train_config.get("data") or {}).get("uri")
    if not dataset_uri:
        raise RegistryError("no dataset URI: pass --dataset (the checkpoint's train_config names none)")
    manifest = read_manifest(dataset_uri)  # checked: a missing or foreign manifest is a clear error
    dest.write_text(manifest.model_dump_json(indent=1))
    return dataset_uri, manifest, manifest_sha256(dataset_uri)


def _source_run(client, run_id: str | None) -> str | None:
    """The checkpoint's training run when this MLflow server has it (it is the version's source), else None."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        return None


@contextmanager
def _model_run(client, source_run: str | None, name: str, params: dict, tags: dict[str, str], tracking_uri: str,
               experiment: str) -> Iterator[str]:
    """The run the model is logged in: the training run, reopened and left as it was (status, end time);
    without one, a new `register-<name>` run with the registration's params and tags."""
    from maskdit.core.tracking import tracking_run

    if source_run is None:
        with tracking_run(run_name=f"register-{name}", params=params, tags=tags, uri=tracking_uri,
                          experiment=experiment) as run_id:
            yield run_id
        return
    before = client.get_run(source_run).info
    mlflow.set_experiment(experiment_id=before.experiment_id)  # MLflow resumes a run only in its own experiment
    with mlflow.start_run(run_id=source_run, nested=mlflow.active_run() is not None):
        yield source_run
    if before.end_time:  # reopening it marked it running and then finished now
        client.set_terminated(source_run, before.status, end_time=before.end_time)


def register(checkpoint_uri: str, fid: float, name: str, *, sampler: SamplerConfig | None = None,
             evaluation: EvaluateResult | None = None, dataset_uri: str | None = None, kfp_run_id: str | None = None,
             tracking_uri: str | None = None, experiment: str = "maskdit",
             tags: dict[str, str] | None = None) -> RegisterResult:
    """Register the checkpoint as a new version of `name`; see the module doc.

    `sampler`: the settings the FID was measured with (the evaluation's when given, else the defaults).
    """
    from mlflow.exceptions import MlflowException

    from maskdit.core.tracking_server import check_reachable, connect, mlflow_failure

    if not (math.isfinite(float(fid)) and float(fid) >= 0):  # what EvaluateResult.fid / RegisterResult.fid demand
        raise RegistryError(f"FID {fid} is no distance (a finite number >= 0): refusing to register it; evaluate "
                            "the checkpoint again (a NaN FID means the model or the statistics are broken)")
    sampler = sampler or (evaluation.sampler if evaluation else SamplerConfig())
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri  # the environment wins, as in tracking.py
    if not tracking_uri:
        raise RegistryError("no MLflow tracking URI: set MLFLOW_TRACKING_URI or pass tracking_uri")
    tracking_uri = connect(tracking_uri)  # credentials in the URI go to MLflow's env, not into logs
    check_reachable(tracking_uri)  # down: retried within MASKDIT_RETRY_BUDGET_S, then one line and exit 143
    try:
        return _register(checkpoint_uri, fid, name, sampler, evaluation, dataset_uri, kfp_run_id, tracking_uri,
                         experiment, tags)
    except MlflowException as error:  # refused (a 403: docs/operating.md, "MLflow accounts"), down, ...: one line
        raise mlflow_failure(error, RegistryError, f"registering {name} in MLflow") from None


def _register(checkpoint_uri: str, fid: float, name: str, sampler: SamplerConfig, evaluation: EvaluateResult | None,
              dataset_uri: str | None, kfp_run_id: str | None, tracking_uri: str, experiment: str,
              tags: dict[str, str] | None) -> RegisterResult:
    import requests
    from mlflow.exceptions import MlflowException

    from maskdit import __version__
    from maskdit.core.tracking_server import transfer_failure

    client = mlflow.MlflowClient()
    version_tags = {FID_TAG: f"{float(fid):.6g}", **{k: str(v) for k, v in sampler.model_dump().items()},
                    **({"kfp_run_id": kfp_run_id} if kfp_run_id else {}), **(tags or {})}
    metrics = {"fid": float(fid)}
    if evaluation is not None:  # what the FID was measured against: FIDs are comparable only under the same
        version_tags.update(ref_stats=evaluation.ref_stats, num_samples=str(evaluation.num_samples),
                            inception=evaluation.inception)
        version_tags.update({k: v for k, v in (("ref_stats_sha256", evaluation.ref_stats_sha256),
                                               ("inception_sha256", evaluation.inception_sha256),
                                               ("evaluate_run_id", evaluation.run_id)) if v})
        metrics.update({k: float(v) for k, v in (("precision", evaluation.precision),
                                                 ("recall", evaluation.recall)) if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint_uri, state = _export(checkpoint_uri, tmp / "ema.safetensors")
        train_config = state.get("train_config") or {}
        dataset_uri, manifest, manifest_sha256 = _manifest(dataset_uri, train_config, tmp / "manifest.json")
        artifacts = {WEIGHTS_ARTIFACT: str(tmp / "ema.safetensors"), MANIFEST_ARTIFACT: str(tmp / "manifest.json")}
        if manifest.space == "latent" and manifest.vae:  # the VAE goes inside: loading never fetches it
            artifacts[VAE_ARTIFACT] = str(save_vae(manifest.vae, tmp / VAE_ARTIFACT))
        elif manifest.space == "latent":
            log.warning("%s names no VAE: version of %s registered without one, it samples latents it cannot "
                        "decode to images (encode with `maskdit encode vae=...` to record one)", dataset_uri, name)
        source_run = _source_run(client, state.get("tracking_run_id"))
        version_tags.update(checkpoint_uri=checkpoint_uri, dataset_manifest=f"{dataset_uri.rstrip('/')}/manifest.json",
                            manifest_sha256=manifest_sha256, **({"train_run_id": source_run} if source_run else {}))
        card = model_card(name, dataset_uri=dataset_uri, manifest=manifest, manifest_sha256=manifest_sha256,
                          model_config=state["model_config"], train_config=train_config, step=state["step"],
                          fid=float(fid), sampler=sampler, evaluation=evaluation, source_run=source_run)
        params = {"fid": fid, **sampler.model_dump(), "checkpoint_uri": checkpoint_uri}
        with _model_run(client, source_run, name, params, version_tags, tracking_uri, experiment) as run_id:
            try:
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=MaskDiTModel(), signature=SIGNATURE,
                    input_example=pd.DataFrame({"class_label": [min(1, manifest.num_classes - 1)], "seed": [0]}),
                    artifacts=artifacts, code_paths=[str(copy_code(tmp / "code"))],
                    model_config={"sampler": sampler.model_dump()},
                    metadata={"maskdit_format": MODEL_FORMAT, "maskdit_version": __version__,
                              "sampler": sampler.model_dump(), DIGESTS: _digests(artifacts)},
                    pip_requirements=requirements(latent=manifest.space == "latent"))
            except (MlflowException, requests.RequestException, OSError) as error:  # not retried here: a retry
                # sends the weights again (gigabytes); the step's retries (KFP) start it over
                size = Path(artifacts[WEIGHTS_ARTIFACT]).stat().st_size / 1e6
                raise transfer_failure(error, RegistryError, f"registering {name}: uploading the model ({size:.1f} "
                                       f"MB of weights) to MLflow at {tracking_uri}", "UPLOAD") from None
        # the evaluation's numbers on the logged model (the registry shows them), in the run that measured them
        measured_in = _source_run(client, evaluation.run_id if evaluation else None) or run_id
        mlflow.log_metrics(metrics, step=state["step"], model_id=info.model_id, run_id=measured_in)
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    client.update_model_version(name, version, description=card)
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion, previous, previous_fid, reason = promote(client, name, str(version), fid, version_tags)
    aliases = client.get_model_version(name, version).aliases
    return RegisterResult(name=name, version=str(version), champion=champion, aliases=sorted(aliases),
                          previous_champion=previous, previous_champion_fid=previous_fid, run_id=run_id,
                          model_uri=f"models:/{name}/{version}", fid=float(fid), reason=reason)


def run(cfg: RegisterConfig) -> RegisterResult:
    """Register what an evaluation scored; write the result to `cfg.out` (default `<evaluation>/register`)."""
    folder = cfg.evaluation.rstrip("/")
    if folder.endswith(RESULT_FILE):
        folder = folder[: -len(RESULT_FILE)].rstrip("/")
    evaluation = read_result(EvaluateResult, result_uri(folder))
    if evaluation.samples:  # it scored images from a file: there is no model to register
        raise RegistryError(f"{folder} scored a samples file ({evaluation.samples}), not a checkpoint: evaluate "
                            "the checkpoint to register it")
    result = register(evaluation.checkpoint, evaluation.fid, cfg.name, evaluation=evaluation,
                      dataset_uri=cfg.dataset or evaluation.dataset, kfp_run_id=cfg.kfp_run_id,
                      tracking_uri=cfg.tracking_uri, experiment=cfg.experiment)
    result.write(result_uri(cfg.out or storage.join(folder, "register")))
    return result

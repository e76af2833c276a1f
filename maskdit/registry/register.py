"""The MLflow Model Registry: a trained MaskDiT as a pyfunc model, with `candidate` / `champion` aliases.

The step is `run(RegisterConfig) -> RegisterResult`: it reads the evaluate step's result (FID,
sampler settings, reference statistics, checkpoint) and calls `register(...)`, which logs a pyfunc
model whose artifacts are an inference-only checkpoint (the EMA weights, no optimizer), the dataset
manifest and, for a latent model, the VAE; with it go the maskdit code and pinned requirements
(`maskdit.registry.bundle`), so a fresh environment loads and serves it. The model is logged in the run
that trained the checkpoint (its `tracking_run_id`, the tune run), so that run is the version's
source; a checkpoint trained without tracking gets a `register-<name>` run instead. The version
gets tags (fid, sampler settings, evaluation settings, dataset manifest, checkpoint URI, training
and evaluate run ids, KFP run id), the evaluation's metrics on the logged model, a model card as
its description (`bundle.model_card`), and the alias `candidate`.

The champion gate. `champion` moves to the new version only when its FID is lower than the
champion's AND both were measured under the same settings (`SETTINGS`: the sha256 of the
reference statistics file, num_samples, the sampler's cfg_scale / num_steps / sigma_min /
sigma_max / rho, the sha256 of the Inception weights). Otherwise the version stays `candidate`
and `RegisterResult.reason` says why ("champion version 3 was evaluated with num_samples=50000,
this one with 10000: not comparable"). A registration without an evaluation (`register()` with no
`evaluation`, so no recorded settings) takes `champion` only when there is none yet; against an
existing champion it is not comparable, and so is any version against a champion registered
without settings: a person moves the alias then (`MlflowClient().set_registered_model_alias`).

Compare-and-set. MLflow has no conditional alias update, so read-compare-move is made atomic
with a per-model lock: a registered model named `<name>.champion-lock`. Creating a registered
model is an insert under a unique name in MLflow's store, so exactly one of several concurrent
creators succeeds; the winner's token is a tag written in the same insert. The holder reads the
champion, compares, moves the alias, re-reads it (verify-after-write) and deletes the lock; the
others poll until it is gone. A lock older than `LOCK_STALE_S` (its holder died between create
and delete; the critical section is a few REST calls) is broken by the next registration. Should
a holder stall past that and lose its lock, the verify step sees the alias moved by someone else
or the lock's token changed and decides again under a new lock, so the better version still ends
as champion. tests/test_registry.py races two processes on a real MLflow server.

The pyfunc model (`mlflow.pyfunc.load_model("models:/<name>@champion")`):

    predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1]}))  # seed, cfg_scale, num_steps optional
    -> pd.DataFrame(class_label, seed, cfg_scale, num_steps, image)   # image: PNG bytes (H x W x 3)

PNG bytes keep the output a plain table that MLflow's REST serving returns as base64; decode
with `PIL.Image.open(io.BytesIO(png))`. A missing seed is the row index; missing cfg_scale /
num_steps use the registered sampler settings. The model is this module's `MaskDiTModel`, loaded
from the model's own copy of maskdit; `mlflow models serve -m models:/<name>@champion` builds its
environment from the model's requirements (README, "Serve a model"). maskdit itself never loads a
registered model that way: `maskdit.evaluation.sources` reads its files without unpickling.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from maskdit.core import storage
from maskdit.core.config import StrictModel
from maskdit.core.errors import UserError
from maskdit.core.result import RESULT_FILE, StepResult, read_result, result_uri
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.evaluation.sources import CHECKPOINT_ARTIFACT, MANIFEST_ARTIFACT, MODEL_FORMAT, VAE_ARTIFACT
from maskdit.method.diffusion import SamplerConfig
from maskdit.registry.bundle import copy_code, model_card, requirements, save_vae

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
FID_TAG = "fid"
# version tags that must be equal for two FIDs to be compared (the sampler's come from SamplerConfig)
# what makes two FIDs comparable: the sampler's precision changes the samples, its `compile` does not
SETTINGS = ("ref_stats_sha256", "num_samples", "cfg_scale", "num_steps", "sigma_min", "sigma_max", "rho", "precision",
            "inception_sha256")
LOCK_SUFFIX = ".champion-lock"  # registered model `<name>.champion-lock`: the champion alias's lock
LOCK_TOKEN_TAG = "maskdit.lock_token"
LOCK_STALE_S = 120.0  # a lock this old lost its holder (the critical section is a few REST calls)
LOCK_WAIT_S = 300.0  # give up waiting for the lock after this (> LOCK_STALE_S: a dead holder's lock is broken first)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "class_label"), ColSpec("long", "seed", required=False),
                   ColSpec("double", "cfg_scale", required=False), ColSpec("long", "num_steps", required=False)]),
    outputs=Schema([ColSpec("long", "class_label"), ColSpec("long", "seed"), ColSpec("double", "cfg_scale"),
                    ColSpec("long", "num_steps"), ColSpec("binary", "image")]),
)


class RegistryError(UserError, RuntimeError):
    """Registration was impossible (no tracking URI, unreadable checkpoint or manifest)."""


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
    previous_champion_fid: float | None
    run_id: str
    model_uri: str  # models:/<name>/<version>
    fid: float
    reason: str | None = None  # why this version did not become the champion (None when it did)


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------

class MaskDiTModel(mlflow.pyfunc.PythonModel):
    """Class-conditional sampling from a registered MaskDiT (EDM Heun sampler with CFG)."""

    def load_context(self, context) -> None:
        import torch

        from maskdit.data.shards import Manifest, load_decoder
        from maskdit.method.checkpoint import load_ema_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precond, self.model_config, _ = load_ema_model(context.artifacts["checkpoint"], self.device)
        manifest = Manifest.model_validate_json(Path(context.artifacts["manifest"]).read_text())
        if VAE_ARTIFACT in context.artifacts:  # the VAE inside the model, not the one the manifest names
            manifest = manifest.model_copy(update={"vae": context.artifacts[VAE_ARTIFACT]})
        self.decode = load_decoder(manifest, self.device)
        config = context.model_config or {}
        self.sampler = SamplerConfig(**config.get("sampler", {}))
        self.batch_size = int(config.get("batch_size", 64))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from maskdit.evaluation.sample import generate, png_bytes

        table = pd.DataFrame(model_input)
        if "class_label" not in table:
            raise ValueError(f"the input needs a class_label column; got columns {list(table.columns)}")
        n = len(table)
        labels = table["class_label"].astype("int64").tolist()
        bad = [c for c in labels if not 0 <= c < self.model_config.num_classes]
        if bad:
            raise ValueError(f"class_label {bad[0]} is outside 0..{self.model_config.num_classes - 1}")
        seeds = table["seed"].astype("int64").tolist() if "seed" in table else list(range(n))
        cfg = table["cfg_scale"].astype(float).tolist() if "cfg_scale" in table else [self.sampler.cfg_scale] * n
        steps = (table["num_steps"].astype("int64").tolist() if "num_steps" in table
                 else [self.sampler.num_steps] * n)
        images: list[bytes | None] = [None] * n
        groups: dict[tuple[float, int], list[int]] = {}
        for i in range(n):  # one sampler call per (cfg_scale, num_steps)
            groups.setdefault((cfg[i], steps[i]), []).append(i)
        for (scale, num_steps), rows in groups.items():
            sampler = self.sampler.model_copy(update={"cfg_scale": scale, "num_steps": num_steps})
            batch = generate(self.precond, self.decode, [labels[i] for i in rows], [seeds[i] for i in rows],
                             sampler, self.batch_size)  # (B, H, W, 3) uint8
            for i, image in zip(rows, batch.numpy()):
                images[i] = png_bytes(image)
        return pd.DataFrame({"class_label": labels, "seed": seeds, "cfg_scale": cfg, "num_steps": steps,
                             "image": images})


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def _export(checkpoint_uri: str, dest: Path) -> tuple[str, dict]:
    """An inference-only copy of a training checkpoint (EMA weights as model and ema, no optimizer);
    returns (its URI, what it says besides weights: model_config, step, train_config, tracking_run_id)."""
    import torch

    from maskdit.method.checkpoint import resolve

    uri, state = resolve(checkpoint_uri)
    slim = {k: state.get(k) for k in ("format_version", "model_config", "step", "train_config")}
    info = {**slim, "tracking_run_id": state.get("tracking_run_id")}
    slim.update(model=state["ema"], ema=state["ema"], optimizer=None, scaler=None)
    torch.save(slim, dest)
    return uri, info


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


def _champion(client, name: str) -> tuple[str | None, float | None, dict[str, str]]:
    """(version, fid, tags) of the current champion of `name`, or (None, None, {})."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, {}
    fid = version.tags.get(FID_TAG)
    # str: a sqlite store gives the version as an int, a tracking server as a string
    return str(version.version), (float(fid) if fid is not None else None), dict(version.tags)


def _shown(key: str, value: str) -> str:
    return f"{key}={value[:12]}..." if key.endswith("sha256") and len(value) > 12 else f"{key}={value}"


def not_comparable(new: dict[str, str], champion: dict[str, str], champion_version: str) -> str | None:
    """Why an FID measured under the `new` tags cannot be compared with the champion's; None when it can."""
    missing = [k for k in SETTINGS if not new.get(k)]
    if missing:
        return (f"this version has no recorded evaluation settings ({', '.join(missing)}), so its FID cannot be "
                f"compared with champion version {champion_version}'s: register an evaluation (maskdit evaluate, "
                "then maskdit register evaluation=...)")
    missing = [k for k in SETTINGS if not champion.get(k)]
    if missing:
        return (f"champion version {champion_version} has no recorded evaluation settings ({', '.join(missing)}): "
                "not comparable; move the champion alias by hand if this version should win")
    differ = [k for k in SETTINGS if new[k] != champion[k]]
    if differ:
        return (f"champion version {champion_version} was evaluated with "
                f"{', '.join(_shown(k, champion[k]) for k in differ)}, this one with "
                f"{', '.join(_shown(k, new[k]) for k in differ)}: not comparable")
    return None


@contextmanager
def champion_lock(client, name: str) -> Iterator[Callable[[], bool]]:
    """Hold `<name>.champion-lock` (see the module doc); yields a check "do I still hold it"."""
    from mlflow.exceptions import MlflowException

    lock, token = name + LOCK_SUFFIX, uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:  # an insert under a unique name: one concurrent creator wins
            client.create_registered_model(lock, tags={LOCK_TOKEN_TAG: token},
                                           description=f"lock of the {CHAMPION} alias of {name} (maskdit register)")
            break
        except MlflowException as error:
            # lost the insert; the server then reads the winner's lock for its message, and answers
            # RESOURCE_DOES_NOT_EXIST when the winner deleted it in between: lost all the same
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held_by = _lock_token(client, lock, stale_only=True)
        if held_by is not None:  # its holder died: break it (the verify step covers a holder that only stalled)
            _delete_lock(client, lock)
        elif time.monotonic() > deadline:
            raise RegistryError(f"registered model {lock!r} (the lock of {name}'s {CHAMPION} alias) was held for "
                                f"{LOCK_WAIT_S:.0f} s; retry, or delete it if no registration of {name} runs")
        time.sleep(random.uniform(0.05, 0.25))

    def held() -> bool:
        return _lock_token(client, lock) == token

    try:
        yield held
    finally:
        if held():
            _delete_lock(client, lock)


def _lock_token(client, lock: str, stale_only: bool = False) -> str | None:
    """The lock's token (None when there is no lock, or with `stale_only` when it is younger than LOCK_STALE_S)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException:
        return None
    if stale_only and time.time() - model.creation_timestamp / 1000 < LOCK_STALE_S:
        return None
    return model.tags.get(LOCK_TOKEN_TAG, "")


def _delete_lock(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def promote(client, name: str, version: str, fid: float,
            tags: dict[str, str]) -> tuple[bool, str | None, float | None, str | None]:
    """Compare-and-set of `champion`: (champion?, previous champion, its FID, reason it stayed candidate)."""
    before = None  # the champion we first saw (the result reports it)
    for _ in range(3):
        with champion_lock(client, name) as held:
            previous, previous_fid, previous_tags = _champion(client, name)
            before = before or (previous, previous_fid)
            if previous == version:  # a retry after a lost lock: we set it, and nobody better moved it since
                return True, *before, None
            reason = None if previous is None else not_comparable(tags, previous_tags, previous)
            if reason is None and previous_fid is not None and not float(fid) < previous_fid:
                reason = f"champion version {previous} has FID {previous_fid:.6g}, this one {float(fid):.6g}"
            if reason is not None:
                return False, previous, previous_fid, reason
            client.set_registered_model_alias(name, CHAMPION, version)
            # verify-after-write: still our alias, and our lock (a stalled holder can lose it as stale)
            if held() and str(client.get_model_version_by_alias(name, CHAMPION).version) == version:
                return True, *before, None
    raise RegistryError(f"lost the lock of {name}'s {CHAMPION} alias three times; retry the registration")


def register(checkpoint_uri: str, fid: float, name: str, *, sampler: SamplerConfig | None = None,
             evaluation: EvaluateResult | None = None, dataset_uri: str | None = None, kfp_run_id: str | None = None,
             tracking_uri: str | None = None, experiment: str = "maskdit",
             tags: dict[str, str] | None = None) -> RegisterResult:
    """Register the checkpoint as a new version of `name`; see the module doc.

    `sampler`: the settings the FID was measured with (the evaluation's when given, else the defaults).
    """
    from maskdit import __version__
    from maskdit.core.tracking import check_reachable, connect

    sampler = sampler or (evaluation.sampler if evaluation else SamplerConfig())
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri  # the environment wins, as in tracking.py
    if not tracking_uri:
        raise RegistryError("no MLflow tracking URI: set MLFLOW_TRACKING_URI or pass tracking_uri")
    tracking_uri = connect(tracking_uri)  # credentials in the URI go to MLflow's env, not into logs
    check_reachable(tracking_uri)  # one line in seconds, not minutes of retries and a traceback
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
        checkpoint_uri, state = _export(checkpoint_uri, tmp / "ema.pt")
        train_config = state.get("train_config") or {}
        dataset_uri, manifest, manifest_sha256 = _manifest(dataset_uri, train_config, tmp / "manifest.json")
        artifacts = {CHECKPOINT_ARTIFACT: str(tmp / "ema.pt"), MANIFEST_ARTIFACT: str(tmp / "manifest.json")}
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
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MaskDiTModel(), signature=SIGNATURE,
                input_example=pd.DataFrame({"class_label": [min(1, manifest.num_classes - 1)], "seed": [0]}),
                artifacts=artifacts, code_paths=[str(copy_code(tmp / "code"))],
                model_config={"sampler": sampler.model_dump()},
                metadata={"maskdit_format": MODEL_FORMAT, "maskdit_version": __version__,
                          "sampler": sampler.model_dump()},
                pip_requirements=requirements(latent=manifest.space == "latent"))
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

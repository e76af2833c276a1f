"""The MLflow Model Registry: a trained MaskDiT as a pyfunc model, with `candidate` / `champion` aliases.

The step is `run(RegisterConfig) -> RegisterResult`: it reads the evaluate step's result (FID,
sampler settings, reference statistics, checkpoint) and calls `register(...)`, which logs a pyfunc model whose artifacts are an
inference-only checkpoint (the EMA weights, no optimizer) and the dataset manifest (which names
the VAE, or says pixel space), registers it as a new version of `name` with tags (fid,
cfg_scale, num_steps, dataset manifest, checkpoint URI, KFP run id), points the alias
`candidate` at it, and moves `champion` to it only when its FID is lower than the champion's.

The pyfunc model (`mlflow.pyfunc.load_model("models:/<name>@champion")`):

    predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1]}))  # seed, cfg_scale, num_steps optional
    -> pd.DataFrame(class_label, seed, cfg_scale, num_steps, image)   # image: PNG bytes (H x W x 3)

PNG bytes keep the output a plain table that MLflow's REST serving returns as base64; decode
with `PIL.Image.open(io.BytesIO(png))`. A missing seed is the row index; missing cfg_scale /
num_steps use the registered sampler settings. Loading through `mlflow.pyfunc` needs the maskdit
package (the project image): the model is this module's `MaskDiTModel`. maskdit itself never
loads a registered model that way: `maskdit.sources` reads its files without unpickling.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from maskdit import storage
from maskdit.config import StrictModel
from maskdit.diffusion import SamplerConfig
from maskdit.errors import UserError
from maskdit.evaluate import EvaluateResult
from maskdit.result import RESULT_FILE, StepResult, read_result, result_uri
from maskdit.sources import CHECKPOINT_ARTIFACT, MANIFEST_ARTIFACT, MODEL_FORMAT

CANDIDATE, CHAMPION = "candidate", "champion"
FID_TAG = "fid"

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


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------

class MaskDiTModel(mlflow.pyfunc.PythonModel):
    """Class-conditional sampling from a registered MaskDiT (EDM Heun sampler with CFG)."""

    def load_context(self, context) -> None:
        import torch

        from maskdit.checkpoint import load_ema_model
        from maskdit.shards import Manifest, load_decoder

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precond, self.model_config, _ = load_ema_model(context.artifacts["checkpoint"], self.device)
        manifest = Manifest.model_validate_json(Path(context.artifacts["manifest"]).read_text())
        self.decode = load_decoder(manifest, self.device)
        config = context.model_config or {}
        self.sampler = SamplerConfig(**config.get("sampler", {}))
        self.batch_size = int(config.get("batch_size", 64))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from maskdit.sample import generate, png_bytes

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
    """An inference-only copy of a training checkpoint (EMA weights as model and ema, no optimizer)."""
    import torch

    from maskdit.checkpoint import resolve

    uri, state = resolve(checkpoint_uri)
    slim = {k: state.get(k) for k in ("format_version", "model_config", "step", "train_config")}
    slim.update(model=state["ema"], ema=state["ema"], optimizer=None, scaler=None)
    torch.save(slim, dest)
    return uri, state.get("train_config") or {}


def _manifest(dataset_uri: str | None, train_config: dict, dest: Path) -> str:
    from maskdit.shards import read_manifest

    dataset_uri = dataset_uri or (train_config.get("data") or {}).get("uri")
    if not dataset_uri:
        raise RegistryError("no dataset URI: pass --dataset (the checkpoint's train_config names none)")
    dest.write_text(read_manifest(dataset_uri).model_dump_json(indent=1))
    return dataset_uri


def champion_fid(client, name: str) -> tuple[str | None, float | None]:
    """(version, fid) of the current champion of `name`, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    fid = version.tags.get(FID_TAG)
    return version.version, (float(fid) if fid is not None else None)


def register(checkpoint_uri: str, fid: float, name: str, *, sampler: SamplerConfig | None = None,
             evaluation: EvaluateResult | None = None, dataset_uri: str | None = None, kfp_run_id: str | None = None,
             tracking_uri: str | None = None, experiment: str = "maskdit",
             tags: dict[str, str] | None = None) -> RegisterResult:
    """Register the checkpoint as a new version of `name`; see the module doc.

    `sampler`: the settings the FID was measured with (the evaluation's when given, else the defaults).
    """
    from maskdit import __version__
    from maskdit.tracking import check_reachable, connect, tracking_run

    sampler = sampler or (evaluation.sampler if evaluation else SamplerConfig())
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri  # the environment wins, as in tracking.py
    if not tracking_uri:
        raise RegistryError("no MLflow tracking URI: set MLFLOW_TRACKING_URI or pass tracking_uri")
    tracking_uri = connect(tracking_uri)  # credentials in the URI go to MLflow's env, not into logs
    check_reachable(tracking_uri)  # one line in seconds, not minutes of retries and a traceback
    client = mlflow.MlflowClient()
    version_tags = {FID_TAG: f"{float(fid):.6g}", **{k: str(v) for k, v in sampler.model_dump().items()},
                    **({"kfp_run_id": kfp_run_id} if kfp_run_id else {}), **(tags or {})}
    if evaluation is not None:  # what the FID was measured against: FIDs are comparable only under the same
        version_tags.update(ref_stats=evaluation.ref_stats, num_samples=str(evaluation.num_samples),
                            inception=evaluation.inception)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_uri, train_config = _export(checkpoint_uri, Path(tmp) / "ema.pt")
        dataset_uri = _manifest(dataset_uri, train_config, Path(tmp) / "manifest.json")
        version_tags.update(checkpoint_uri=checkpoint_uri, dataset_manifest=f"{dataset_uri.rstrip('/')}/manifest.json")
        with tracking_run(run_name=f"register-{name}", params={"fid": fid, **sampler.model_dump(),
                          "checkpoint_uri": checkpoint_uri}, tags=version_tags,
                          uri=tracking_uri, experiment=experiment) as run_id:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MaskDiTModel(), signature=SIGNATURE,
                artifacts={CHECKPOINT_ARTIFACT: str(Path(tmp) / "ema.pt"),
                           MANIFEST_ARTIFACT: str(Path(tmp) / "manifest.json")},
                model_config={"sampler": sampler.model_dump()},
                metadata={"maskdit_format": MODEL_FORMAT, "sampler": sampler.model_dump()},
                # served from the project image; pinning keeps MLflow from inferring (slowly) what it imports
                pip_requirements=[f"maskdit=={__version__}", f"mlflow=={mlflow.__version__}", "torch", "pandas"])
            mlflow.log_metric("fid", float(fid))
    version = mlflow.register_model(info.model_uri, name, tags=version_tags).version
    client.set_registered_model_alias(name, CANDIDATE, version)
    previous, previous_fid = champion_fid(client, name)
    champion = previous is None or previous_fid is None or float(fid) < previous_fid
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    aliases = client.get_model_version(name, version).aliases
    return RegisterResult(name=name, version=str(version), champion=champion, aliases=sorted(aliases),
                          previous_champion=previous, previous_champion_fid=previous_fid, run_id=run_id,
                          model_uri=f"models:/{name}/{version}", fid=float(fid))


def run(cfg: RegisterConfig) -> RegisterResult:
    """Register what an evaluation scored; write the result to `cfg.out` (default `<evaluation>/register`)."""
    folder = cfg.evaluation.rstrip("/")
    if folder.endswith(RESULT_FILE):
        folder = folder[: -len(RESULT_FILE)].rstrip("/")
    evaluation = read_result(EvaluateResult, result_uri(folder))
    if evaluation.samples and not evaluation.step and evaluation.checkpoint == evaluation.samples:
        raise RegistryError(f"{folder} scored a samples file ({evaluation.samples}), not a checkpoint: evaluate "
                            "the checkpoint to register it")
    result = register(evaluation.checkpoint, evaluation.fid, cfg.name, evaluation=evaluation,
                      dataset_uri=cfg.dataset or evaluation.dataset, kfp_run_id=cfg.kfp_run_id,
                      tracking_uri=cfg.tracking_uri, experiment=cfg.experiment)
    result.write(result_uri(cfg.out or storage.join(folder, "register")))
    return result

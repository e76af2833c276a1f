"""What a registered model carries so that it stands on its own: code, requirements, VAE, model card.

`maskdit register` logs the pyfunc model with
- the `maskdit` package itself as MLflow code (`code/maskdit`, put on `sys.path` when the model
  loads): the model needs no installed maskdit, and the code is exactly the one that registered it;
- pip requirements pinned to what is installed here: only what inference imports (`requirements`),
  so `mlflow models serve` builds a small environment from the package index. (A wheel of the
  project would drag in its whole dependency list - Kubeflow, Kubernetes, boto3 - and MLflow's
  environment cache is keyed by the requirement text, so a rebuilt wheel of the same version
  would be served from a stale environment.);
- for a latent model, the VAE saved with `save_pretrained` (safetensors) from wherever the dataset
  manifest names it (hub cache, local or s3:// folder): loading never reaches the hub;
- a model card (Markdown, the version's description): `model_card`.
"""

from __future__ import annotations

import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from maskdit.core import storage
from maskdit.method.modelformat import VAE_ARTIFACT

# safetensors: the registered weights (bf16 safetensors, maskdit/method/weights.py)
INFERENCE_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml", "pillow", "tqdm", "safetensors")
LATENT_PACKAGES = ("diffusers",)  # the VAE decoder


def requirements(latent: bool) -> list[str]:
    """`name==version` of what inference imports, as installed here (a local build label like +cpu dropped:
    the package index has the public release)."""
    names = INFERENCE_PACKAGES + (LATENT_PACKAGES if latent else ())
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]


def copy_code(dest: Path) -> Path:
    """The imported `maskdit` package copied to `dest/maskdit` (no bytecode): the model's code path."""
    import maskdit

    source = Path(maskdit.__file__).parent
    return Path(shutil.copytree(source, dest / "maskdit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


def save_vae(spec: str, dest: Path) -> Path:
    """The manifest's VAE (hub id resolved through the local cache, local or s3:// folder) saved to `dest`."""
    from maskdit.data.vae import load_vae

    load_vae(spec).save_pretrained(dest, safe_serialization=True)
    return dest


def preset_name(model_config: dict[str, Any]) -> str | None:
    """The model preset whose network fields the config has ("XL/2"), else None; the data's fields
    (input size, channels, classes) may differ from the preset's."""
    from maskdit.method.model import MODEL_PRESETS

    data = ("input_size", "in_channels", "num_classes")
    matches = [name for name, fields in MODEL_PRESETS.items()
               if all(model_config.get(k) == v for k, v in fields.items() if k not in data)]
    return max(matches, key=lambda name: len(MODEL_PRESETS[name]), default=None)  # the most specific


def _pretraining(init_from: str | None) -> str:
    """The checkpoint this run started from, with its step (from the file name: nothing is downloaded)."""
    if not init_from:
        return "none: trained from scratch in this run"
    step = None
    match = re.search(r"ckpt-(\d+)(?:\.pt)?/?$", init_from)  # a file or a sharded checkpoint folder
    if match:
        step = int(match.group(1))
    elif "://" not in init_from or storage.is_s3(init_from):  # a checkpoint folder: its newest file's name
        from maskdit.method.checkpoint import list_checkpoints

        try:
            step = (list_checkpoints(init_from) or [(None, None)])[-1][0]
        except storage.StorageError:
            step = None
    return f"`{init_from}`" + (f" (step {step:,})" if step is not None else "")


def model_card(name: str, *, dataset_uri: str, manifest, manifest_sha256: str, model_config: dict[str, Any],
               train_config: dict[str, Any], step: int, fid: float, sampler, evaluation=None,
               source_run: str | None = None) -> str:
    """The version's description: data, recipe, FID with its settings, how to sample."""
    mask = train_config.get("mask") or {}
    batch = train_config.get("batch") or {}
    optim = train_config.get("optim") or {}
    shape = "x".join(str(s) for s in manifest.shape)
    decoder = (f"VAE `{manifest.vae}` (inside the model, folder `{VAE_ARTIFACT}`), scale factor "
               f"{manifest.scale_factor}" if manifest.space == "latent" and manifest.vae else
               "none recorded: latents it cannot decode to images" if manifest.space == "latent" else
               "none (pixel space)")
    lines = [
        f"# {name}", "",
        "Class-conditional MaskDiT (EDM preconditioning, Heun sampler with classifier-free guidance).", "",
        "## Data", "",
        "| | |", "|---|---|",
        f"| dataset | `{dataset_uri}` |",
        f"| manifest sha256 | `{manifest_sha256}` |",
        *([f"| dataset id | `{manifest.identity.digest}` (the digest of its source listing, VAE and options) |"]
          if manifest.identity else []),
        f"| samples | {manifest.count:,} ({manifest.images:,} images"
        f"{', with flipped copies' if manifest.flip else ''}) |",
        f"| classes | {manifest.num_classes} |",
        f"| x0 | {shape} ({manifest.space} space, {manifest.resolution} px images) |",
        f"| decoder | {decoder} |", "",
        "## Recipe", "",
        "| | |", "|---|---|",
        f"| model | {preset_name(model_config) or 'custom'}: hidden {model_config['hidden_size']}, depth "
        f"{model_config['depth']}, patch {model_config['patch_size']}, decoder depth {model_config['decoder_depth']} |",
        f"| pretraining | {_pretraining(train_config.get('init_from'))} |",
        f"| this run | {step:,} steps, mask ratio {mask.get('ratio', '-')} ({mask.get('schedule', '-')}), "
        f"global batch {batch.get('global_batch', '-')}, lr {optim.get('lr', '-')} |",
        f"| training run | {f'MLflow run `{source_run}`' if source_run else '-'} |", "",
        "## FID", "",
        "| | |", "|---|---|",
        f"| FID | {fid:.4g} |",
    ]
    if evaluation is not None:
        lines += [
            f"| samples | {evaluation.num_samples:,} (seed {evaluation.seed}) |",
            f"| reference statistics | `{evaluation.ref_stats}` (sha256 `{evaluation.ref_stats_sha256 or '-'}`) |",
            f"| Inception | {evaluation.inception} (sha256 `{evaluation.inception_sha256 or '-'}`) |",
        ]
        if evaluation.precision is not None:
            lines.append(f"| precision / recall | {evaluation.precision:.4g} / {evaluation.recall:.4g} |")
    lines += [
        f"| sampler | {sampler.num_steps} Heun steps, CFG scale {sampler.cfg_scale}, sigma "
        f"{sampler.sigma_min}..{sampler.sigma_max}, rho {sampler.rho}, {sampler.precision} |", "",
        "## Sample", "",
        "One row per image: `class_label` (0..{}), optional `seed`, `cfg_scale`, `num_steps`; each answer row "
        "carries the image as PNG bytes (base64 over REST).".format(manifest.num_classes - 1), "",
        "```python",
        "import io, mlflow, pandas as pd",
        "from PIL import Image",
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        'out = model.predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1]}))',
        'Image.open(io.BytesIO(out["image"][0])).save("sample.png")',
        "```", "",
        "```bash",
        f"mlflow models serve -m models:/{name}@champion --host 127.0.0.1 --port 5000",
        "curl -s http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \\",
        """  -d '{"dataframe_split": {"columns": ["class_label", "seed"], "data": [[1, 0], [7, 1]]}}'""",
        "# -> {\"predictions\": [{\"class_label\": 1, \"seed\": 0, ..., \"image\": \"<base64 PNG>\"}, ...]}",
        "```",
    ]
    return "\n".join(lines) + "\n"

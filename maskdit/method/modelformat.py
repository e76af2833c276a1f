"""What a registered maskdit model is, as files: its format marker, its artifacts, and reading them.

`maskdit register` (maskdit/registry/) logs an MLflow pyfunc model whose `MLmodel` description has
`metadata.maskdit_format` = MODEL_FORMAT and names its artifacts under
`flavors.python_function.artifacts`: the inference checkpoint (CHECKPOINT_ARTIFACT: EMA weights,
no optimizer), the dataset manifest (MANIFEST_ARTIFACT) and, for a latent model, its VAE saved as
safetensors (VAE_ARTIFACT). The readers here take those files directly - the `MLmodel` as YAML
(parsed safely), each artifact by download - so nothing stored in the registry is unpickled or
executed: sampling (maskdit/evaluation/sources.py) and warm starts (maskdit/train/warmstart.py)
read registered models this way. A version that is not a maskdit model is refused before any
weights are downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from maskdit.core.errors import UserError

MODEL_FORMAT = 1  # `maskdit_format` in the metadata of every model version `maskdit register` logs
CHECKPOINT_ARTIFACT, MANIFEST_ARTIFACT = "checkpoint", "manifest"  # the model's artifact names
VAE_ARTIFACT = "vae"  # a latent model's VAE (save_pretrained folder), inside the model


class ModelFormatError(UserError, ValueError):
    """A registered model that cannot be read as a maskdit model (unreachable, not one, incomplete); names the URI."""


def download(uri: str, dest: str) -> Path:
    """The file or folder at `uri` (`models:/...` path) downloaded into `dest`."""
    from maskdit.core.retry import retrying

    return retrying(lambda: _download_once(uri, dest), f"MLflow registry {uri}")


def _download_once(uri: str, dest: str) -> Path:
    """One try: a registry that is down or busy is a `TrackingUnavailable` (retried); one that refuses the
    path (unknown model or version, a path outside the version, HTML) a `ModelFormatError` (exit 2)."""
    import mlflow
    import requests

    from maskdit.core.tracking_server import mlflow_failure, quick_requests

    try:
        with quick_requests():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest))
    except (mlflow.exceptions.MlflowException, requests.RequestException, OSError) as error:
        raise mlflow_failure(error, ModelFormatError, f"cannot read {uri} from the MLflow registry") from None


def model_description(uri: str, dest: str) -> dict[str, Any]:
    """The version's `MLmodel` (YAML, parsed safely); ModelFormatError unless `maskdit register` wrote it."""
    description = yaml.safe_load(download(f"{uri.rstrip('/')}/MLmodel", dest).read_text()) or {}
    if (description.get("metadata") or {}).get("maskdit_format") != MODEL_FORMAT:
        raise ModelFormatError(f"{uri} is not a maskdit model (its MLmodel has no metadata.maskdit_format "
                               f"{MODEL_FORMAT}); register it with `maskdit register`, or pass another model")
    return description


def artifact_path(description: dict[str, Any], name: str) -> str | None:
    """The path inside the model of the artifact `name`, as its `MLmodel` names it (None: it names none)."""
    artifacts = (description.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    return (artifacts.get(name) or {}).get("path")


def required_artifacts(uri: str, description: dict[str, Any], *names: str) -> list[str]:
    """The paths of the artifacts `names`; ModelFormatError when the `MLmodel` lacks one."""
    paths = [artifact_path(description, name) for name in names]
    if not all(paths):
        plural = "s" if len(names) > 1 else ""
        raise ModelFormatError(f"{uri}: its MLmodel names no {'/'.join(names)} artifact{plural}; was it registered "
                               "by this maskdit?")
    return paths


def download_vae(uri: str, path: str, dest: str) -> Path:
    """The model's VAE folder (weights as safetensors only: nothing unpickled), downloaded into `dest`."""
    folder = download(f"{uri.rstrip('/')}/{path}", dest)
    if not any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        raise ModelFormatError(f"{uri}: its {VAE_ARTIFACT} folder holds no safetensors weights (or pickled ones); "
                               "register it again with this maskdit")
    return folder


def registered_checkpoint(uri: str, dest: str) -> Path:
    """The inference checkpoint of a registered maskdit model (`models:/<name>/<version>`), downloaded into `dest`.

    Only the `MLmodel` description and that file are read (load it with `checkpoint.load_checkpoint`,
    which uses `weights_only`): training warm starts from a registered model this way (maskdit/train/warmstart.py).
    """
    description = model_description(uri, dest)
    [path] = required_artifacts(uri, description, CHECKPOINT_ARTIFACT)
    return download(f"{uri.rstrip('/')}/{path}", dest)

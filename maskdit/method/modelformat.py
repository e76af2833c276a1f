"""What a registered maskdit model is, as files: its format marker, its artifacts, and reading them.

`maskdit register` (maskdit/registry/) logs an MLflow pyfunc model whose `MLmodel` description has
`metadata.maskdit_format` = MODEL_FORMAT and names its artifacts under
`flavors.python_function.artifacts`: the EMA weights (WEIGHTS_ARTIFACT: bfloat16 safetensors,
`maskdit.method.weights.save_ema`), the dataset manifest (MANIFEST_ARTIFACT) and, for a latent
model, its VAE saved as safetensors (VAE_ARTIFACT); `metadata.sha256` records the sha256 of every
one of those files (a folder's: per file), and every load checks them (one line naming the version
and both digests on a mismatch). Format 1 (before the weights moved to safetensors) carried an
fp32 `torch.save` inference checkpoint (CHECKPOINT_ARTIFACT, read with `weights_only`) and no
digests; such versions still load, with every other check.

The readers here take those files directly - the `MLmodel` as YAML (parsed safely), each artifact
by download - so nothing stored in the registry is unpickled or executed: sampling
(maskdit/evaluation/sources.py) and warm starts (maskdit/train/warmstart.py) read registered models
this way. The tracking server is checked reachable first (a few seconds, not minutes of retries); a
version that is not a maskdit model, or whose `MLmodel` names a path outside the model's folder, is
refused before any weights are downloaded; the weights pass `maskdit.method.weights`'s checks.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from maskdit.core.errors import UserError

MODEL_FORMAT = 2  # `maskdit_format` in the metadata of every model version `maskdit register` logs
READABLE_FORMATS = (1, 2)  # 1: an fp32 torch checkpoint (CHECKPOINT_ARTIFACT), no digests
WEIGHTS_ARTIFACT, MANIFEST_ARTIFACT = "weights", "manifest"  # the model's artifact names
CHECKPOINT_ARTIFACT = "checkpoint"  # format 1's weights
DIGESTS = "sha256"  # metadata key: {artifact name: sha256, or {file in the folder: sha256}}
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

    from maskdit.core.tracking_server import quick_requests, transfer_failure

    try:
        with quick_requests():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest))
    except (mlflow.exceptions.MlflowException, requests.RequestException, OSError) as error:
        raise transfer_failure(error, ModelFormatError, f"cannot read {uri} from the MLflow registry",
                               "DOWNLOAD") from None


def model_description(uri: str, dest: str) -> dict[str, Any]:
    """The version's `MLmodel` (YAML, parsed safely); ModelFormatError unless `maskdit register` wrote it."""
    import mlflow

    from maskdit.core.tracking_server import check_reachable

    check_reachable(mlflow.get_tracking_uri())  # one line in seconds when the server is down
    try:
        description = yaml.safe_load(download(f"{uri.rstrip('/')}/MLmodel", dest).read_text()) or {}
    except yaml.YAMLError as error:
        raise ModelFormatError(f"{uri}: its MLmodel is not YAML ({' '.join(str(error).split())[:160]})") from None
    if not isinstance(description, dict) or \
            (description.get("metadata") or {}).get("maskdit_format") not in READABLE_FORMATS:
        raise ModelFormatError(f"{uri} is not a maskdit model (its MLmodel has no metadata.maskdit_format in "
                               f"{list(READABLE_FORMATS)}); register it with `maskdit register`, or pass another model")
    return description


def model_format(description: dict[str, Any]) -> int:
    return description["metadata"]["maskdit_format"]


def artifact_path(description: dict[str, Any], name: str, uri: str = "the model") -> str | None:
    """The path inside the model of the artifact `name`, as its `MLmodel` names it (None: it names none);
    ModelFormatError for a path that leaves the model's folder (absolute, or with `..`)."""
    artifacts = (description.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    path = (artifacts.get(name) or {}).get("path")
    if path is not None and (not isinstance(path, str) or path.startswith(("/", "\\")) or ":" in path
                             or ".." in PurePosixPath(path.replace("\\", "/")).parts):
        raise ModelFormatError(f"{uri}: its MLmodel names the {name} artifact at {path!r}, outside the model's folder; "
                               "refusing it: register the model again with `maskdit register`")
    return path


def recorded_digests(description: dict[str, Any]) -> dict[str, Any]:
    """{artifact name: sha256 or {file: sha256}} recorded at registration ({} for format 1)."""
    return (description.get("metadata") or {}).get(DIGESTS) or {}


def check_artifact(uri: str, description: dict[str, Any], name: str, local: Path) -> None:
    """The downloaded artifact `name` (file or folder) against its recorded sha256; format 1 records none."""
    from maskdit.method.weights import WeightsError, check_digest

    expected = recorded_digests(description).get(name)
    if expected is None:
        if model_format(description) >= 2:
            raise ModelFormatError(f"{uri}: its MLmodel records no sha256 of its {name} artifact; register it again")
        return
    files = {"": expected} if isinstance(expected, str) else expected
    for relative, digest in files.items():
        path = local / relative if relative else local
        if not path.is_file():
            raise ModelFormatError(f"{uri}: its {name} artifact lacks {relative or path.name}, recorded at registration")
        try:
            check_digest(path, digest, f"{uri} ({name} {relative or path.name})")
        except WeightsError as error:
            raise ModelFormatError(str(error)) from None


def required_artifacts(uri: str, description: dict[str, Any], *names: str) -> list[str]:
    """The paths of the artifacts `names`; ModelFormatError when the `MLmodel` lacks one."""
    paths = [artifact_path(description, name, uri) for name in names]
    if not all(paths):
        plural = "s" if len(names) > 1 else ""
        raise ModelFormatError(f"{uri}: its MLmodel names no {'/'.join(names)} artifact{plural}; was it registered "
                               "by this maskdit?")
    return paths


def download_checked(uri: str, description: dict[str, Any], name: str, path: str, dest: str) -> Path:
    """The artifact `name` at `path`, downloaded into `dest` and checked against its recorded sha256."""
    local = download(f"{uri.rstrip('/')}/{path}", dest)
    check_artifact(uri, description, name, local)
    return local


def download_vae(uri: str, description: dict[str, Any], path: str, dest: str) -> Path:
    """The model's VAE folder (weights as safetensors only: nothing unpickled), downloaded into `dest`."""
    folder = download_checked(uri, description, VAE_ARTIFACT, path, dest)
    if not any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        raise ModelFormatError(f"{uri}: its {VAE_ARTIFACT} folder holds no safetensors weights (or pickled ones); "
                               "register it again with this maskdit")
    return folder


def registered_state(uri: str, dest: str, description: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checked weights of a registered maskdit model (`models:/<name>/<version>`) as a checkpoint-like state
    (`model_config`, `model` = `ema` in float32, `step`, `train_config`), downloaded into `dest`.

    Only the `MLmodel` description and the weights file are read: training warm starts from a registered model
    this way (maskdit/train/warmstart.py), sampling too (maskdit/evaluation/sources.py).
    """
    from maskdit.method.checkpoint import CheckpointError, load_checkpoint
    from maskdit.method.weights import WeightsError, read_ema

    description = description or model_description(uri, dest)
    name = WEIGHTS_ARTIFACT if model_format(description) >= 2 else CHECKPOINT_ARTIFACT
    [path] = required_artifacts(uri, description, name)
    local = download_checked(uri, description, name, path, dest)
    try:
        return read_ema(local, f"{uri} ({path})") if name == WEIGHTS_ARTIFACT else load_checkpoint(str(local))
    except (WeightsError, CheckpointError) as error:
        raise ModelFormatError(" ".join(str(error).replace(str(local), f"{uri} ({path})").split())) from None


def local_state(artifacts: dict[str, str]) -> dict[str, Any]:
    """The checked weights of a model MLflow downloaded (the pyfunc's `context.artifacts`), checked against the
    digests in the `MLmodel` beside them when it records some."""
    from maskdit.method.checkpoint import load_checkpoint
    from maskdit.method.weights import read_ema

    name = WEIGHTS_ARTIFACT if WEIGHTS_ARTIFACT in artifacts else CHECKPOINT_ARTIFACT
    local = Path(artifacts[name])
    mlmodel = local.parent.parent / "MLmodel"
    if mlmodel.is_file():
        description = yaml.safe_load(mlmodel.read_text()) or {}
        if (description.get("metadata") or {}).get("maskdit_format") in READABLE_FORMATS:
            check_artifact(str(local.parent.parent), description, name, local)
    return read_ema(local, str(local)) if name == WEIGHTS_ARTIFACT else load_checkpoint(str(local))

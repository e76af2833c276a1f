"""What to sample from: a training checkpoint, or a model version in the MLflow registry.

- a checkpoint file or folder URI: its EMA weights (`checkpoint.load_ema_model`), decoded with the
  VAE named by a dataset manifest (`dataset`, else the checkpoint's `train_config.data.uri`);
- `models:/<name>@<alias>` or `models:/<name>/<version>`: a version that `maskdit register` logged.
  Its files are read directly - the `MLmodel` description, the inference checkpoint (loaded with
  `weights_only`), the manifest, a latent model's VAE (safetensors) - so nothing stored in the
  registry is unpickled or executed here (not even its copy of maskdit): a crafted model version
  cannot run code on the machine that samples from it. A version
  that is not a maskdit model (no `maskdit_format` in its metadata) is refused before any download
  of weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from maskdit.core.errors import UserError

Decoder = Callable[[torch.Tensor], torch.Tensor]  # x0 (B, C, h, w) -> uint8 images (B, H, W, 3)


class SampleError(UserError, ValueError):
    """Bad sampling input (classes, counts, a model that does not fit its decoder); names the value."""


MODEL_FORMAT = 1  # `maskdit_format` in the metadata of every model version `maskdit register` logs
CHECKPOINT_ARTIFACT, MANIFEST_ARTIFACT = "checkpoint", "manifest"  # the model's artifact names
VAE_ARTIFACT = "vae"  # a latent model's VAE (save_pretrained folder), inside the model


@dataclass
class SamplerSource:
    precond: torch.nn.Module  # EDMPrecond in eval mode
    decode: Decoder
    config: Any  # ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)  # uri, step, dataset, ...


def check_decoder_fits(config, manifest, source: str) -> None:
    """The model's x0 must be what the manifest's decoder takes, and its classes the dataset's."""
    model_shape = (config.in_channels, config.input_size, config.input_size)
    if tuple(manifest.shape) != model_shape:
        raise SampleError(f"{source}: the model makes x0 of shape {model_shape} but the dataset manifest's "
                          f"decoder takes {tuple(manifest.shape)} ({manifest.space} space); pass the dataset "
                          "the model was trained on")
    if manifest.num_classes != config.num_classes:
        raise SampleError(f"{source}: the model has {config.num_classes} classes, the dataset "
                          f"{manifest.num_classes}; pass the dataset the model was trained on")


def load_sampler_source(uri: str, device: torch.device | str = "cpu", dataset: str | None = None) -> SamplerSource:
    """EMA model + decoder from a checkpoint URI (file or folder) or an MLflow `models:/` URI."""
    if str(uri).startswith("models:/"):
        return load_registered(uri, device)
    from maskdit.data.shards import load_decoder, read_manifest
    from maskdit.method.checkpoint import load_ema_model

    precond, config, meta = load_ema_model(uri, device)
    dataset = dataset or ((meta.get("train_config") or {}).get("data") or {}).get("uri")
    if not dataset:
        raise SampleError(f"checkpoint {meta.get('uri', uri)} names no dataset (train_config.data.uri); pass "
                          "the dataset whose manifest names the VAE (or pixel space)")
    manifest = read_manifest(dataset)
    check_decoder_fits(config, manifest, f"checkpoint {meta.get('uri', uri)}")
    return SamplerSource(precond, load_decoder(manifest, device), config, {**meta, "dataset": dataset})


def _download(uri: str, dest: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest))
    except mlflow.exceptions.MlflowException as error:
        raise SampleError(f"cannot read {uri} from the MLflow registry: {error.message}") from None


def model_description(uri: str, dest: str) -> dict[str, Any]:
    """The version's `MLmodel` (YAML, parsed safely); SampleError unless `maskdit register` wrote it."""
    description = yaml.safe_load(_download(f"{uri.rstrip('/')}/MLmodel", dest).read_text()) or {}
    if (description.get("metadata") or {}).get("maskdit_format") != MODEL_FORMAT:
        raise SampleError(f"{uri} is not a maskdit model (its MLmodel has no metadata.maskdit_format "
                          f"{MODEL_FORMAT}); register it with `maskdit register`, or pass another model")
    return description


def registered_checkpoint(uri: str, dest: str) -> Path:
    """The inference checkpoint of a registered maskdit model (`models:/<name>/<version>`), downloaded into `dest`.

    Only the `MLmodel` description and that file are read (load it with `checkpoint.load_checkpoint`,
    which uses `weights_only`): training warm starts from a registered model this way (maskdit/train/warmstart.py).
    """
    description = model_description(uri, dest)
    artifacts = (description.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    path = (artifacts.get(CHECKPOINT_ARTIFACT) or {}).get("path")
    if not path:
        raise SampleError(f"{uri}: its MLmodel names no {CHECKPOINT_ARTIFACT} artifact; was it registered by this "
                          "maskdit?")
    return _download(f"{uri.rstrip('/')}/{path}", dest)


def load_registered(uri: str, device: torch.device | str = "cpu") -> SamplerSource:
    """A registered maskdit model from its files alone (see the module doc): nothing is unpickled."""
    from maskdit.data.shards import Manifest, load_decoder
    from maskdit.method.checkpoint import load_ema_model

    with tempfile.TemporaryDirectory(prefix="maskdit-model-") as tmp:
        description = model_description(uri, tmp)
        artifacts = (description.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
        paths = {name: (artifacts.get(name) or {}).get("path") for name in (CHECKPOINT_ARTIFACT, MANIFEST_ARTIFACT)}
        if not all(paths.values()):
            raise SampleError(f"{uri}: its MLmodel names no {CHECKPOINT_ARTIFACT}/{MANIFEST_ARTIFACT} artifacts; "
                              "was it registered by this maskdit?")
        checkpoint = _download(f"{uri.rstrip('/')}/{paths[CHECKPOINT_ARTIFACT]}", tmp)
        manifest = Manifest.model_validate_json(_download(f"{uri.rstrip('/')}/{paths[MANIFEST_ARTIFACT]}",
                                                          tmp).read_text())
        precond, config, meta = load_ema_model(str(checkpoint), device)
        check_decoder_fits(config, manifest, uri)
        vae = (artifacts.get(VAE_ARTIFACT) or {}).get("path")
        if vae:  # the VAE inside the model (weights as safetensors only: nothing unpickled)
            folder = _download(f"{uri.rstrip('/')}/{vae}", tmp)
            if not any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
                raise SampleError(f"{uri}: its {VAE_ARTIFACT} folder holds no safetensors weights (or pickled ones); "
                                  "register it again with this maskdit")
            manifest = manifest.model_copy(update={"vae": str(folder)})
        decode = load_decoder(manifest, device)
    sampler = (description.get("metadata") or {}).get("sampler") or {}
    return SamplerSource(precond, decode, config, {"uri": uri, "step": meta["step"], "sampler": sampler})

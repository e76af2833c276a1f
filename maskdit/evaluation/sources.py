"""What to sample from: a training checkpoint, or a model version in the MLflow registry.

- a checkpoint file or folder URI: its EMA weights (`checkpoint.load_ema_model`), decoded with the
  VAE named by a dataset manifest (`dataset`, else the checkpoint's `train_config.data.uri`);
- `models:/<name>@<alias>` or `models:/<name>/<version>`: a version that `maskdit register` logged.
  Its files are read directly (`maskdit.method.modelformat`) - the `MLmodel` description, the
  EMA weights (safetensors; a format-1 version's inference checkpoint, loaded with `weights_only`),
  the manifest, a latent model's VAE (safetensors) - so nothing stored in the registry is unpickled
  or executed here (not even its copy of maskdit): a crafted model version cannot run code on the
  machine that samples from it. Each file is checked against the sha256 recorded at registration
  and the weights against their config before the network is built (`maskdit.method.weights`). A
  version that is not a maskdit model (no `maskdit_format` in its metadata) is refused before any
  download of weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from maskdit.core.errors import UserError
from maskdit.method.modelformat import (
    MANIFEST_ARTIFACT,
    VAE_ARTIFACT,
    ModelFormatError,
    artifact_path,
    download_checked,
    download_vae,
    model_description,
    registered_state,
    required_artifacts,
)

Decoder = Callable[[torch.Tensor], torch.Tensor]  # x0 (B, C, h, w) -> uint8 images (B, H, W, 3)


class SampleError(UserError, ValueError):
    """Bad sampling input (classes, counts, a model that does not fit its decoder); names the value."""


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
    from maskdit.data.decode import load_decoder
    from maskdit.data.shards import read_manifest
    from maskdit.method.checkpoint import load_ema_model

    precond, config, meta = load_ema_model(uri, device)
    dataset = dataset or ((meta.get("train_config") or {}).get("data") or {}).get("uri")
    if not dataset:
        raise SampleError(f"checkpoint {meta.get('uri', uri)} names no dataset (train_config.data.uri); pass "
                          "the dataset whose manifest names the VAE (or pixel space)")
    manifest = read_manifest(dataset)
    check_decoder_fits(config, manifest, f"checkpoint {meta.get('uri', uri)}")
    return SamplerSource(precond, load_decoder(manifest, device), config, {**meta, "dataset": dataset})


def load_registered(uri: str, device: torch.device | str = "cpu") -> SamplerSource:
    """A registered maskdit model from its files alone (see the module doc): nothing is unpickled."""
    try:
        return _load_registered(uri, device)
    except ModelFormatError as error:  # sampling's contract: a model that cannot be sampled is a SampleError
        raise SampleError(str(error)) from None


def _load_registered(uri: str, device: torch.device | str) -> SamplerSource:
    from maskdit.data.decode import load_decoder
    from maskdit.data.shards import Manifest
    from maskdit.method.weights import ema_precond

    with tempfile.TemporaryDirectory(prefix="maskdit-model-") as tmp:
        description = model_description(uri, tmp)
        [manifest_path] = required_artifacts(uri, description, MANIFEST_ARTIFACT)
        manifest_file = download_checked(uri, description, MANIFEST_ARTIFACT, manifest_path, tmp)
        manifest = Manifest.model_validate_json(manifest_file.read_text())
        state = registered_state(uri, tmp, description)
        precond, config = ema_precond(state, uri, device)
        check_decoder_fits(config, manifest, uri)
        vae = artifact_path(description, VAE_ARTIFACT, uri)
        if vae:  # the VAE inside the model
            manifest = manifest.model_copy(update={"vae": str(download_vae(uri, description, vae, tmp))})
        decode = load_decoder(manifest, device)
    sampler = (description.get("metadata") or {}).get("sampler") or {}
    return SamplerSource(precond, decode, config, {"uri": uri, "step": state["step"], "sampler": sampler})

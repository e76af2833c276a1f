"""The Stable Diffusion VAE (diffusers AutoencoderKL): encode writes its moments, sampling decodes with it.

Its own module so that encoding (maskdit.data.encode) and decoding (maskdit.data.decode.load_decoder) share
one loader without importing each other.
"""

from __future__ import annotations

import tempfile

import torch

from maskdit.core import storage
from maskdit.core.errors import UserError
from maskdit.data.identity import file_digest, listing_digest

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


class VAEError(UserError, ValueError):
    """The VAE named by an option or a manifest cannot be loaded; the message says what to pass."""


def load_vae(spec: str, device: str | torch.device = "cpu"):
    """diffusers AutoencoderKL (eval, float32) from a hub id, a local directory or an s3:// directory."""
    from diffusers import AutoencoderKL

    kwargs = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False}
    try:
        if storage.is_s3(spec):
            with tempfile.TemporaryDirectory(prefix="maskdit-vae-") as tmp:
                vae = AutoencoderKL.from_pretrained(storage.get_tree(spec, tmp), **kwargs)
        elif storage.local_path(spec).is_dir():
            vae = AutoencoderKL.from_pretrained(storage.local_path(spec), **kwargs)
        else:
            vae = AutoencoderKL.from_pretrained(spec, **kwargs)
    except storage.StorageError:
        raise
    except (OSError, ValueError) as error:
        raise VAEError(f"cannot load the VAE {spec!r}: {error}\nPass a hub id the node can reach, or a local "
                       "or s3:// directory holding an AutoencoderKL saved with save_pretrained") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_identity(spec: str) -> str:
    """What identifies the VAE `spec` loads, from listings and local bytes (nothing is loaded):

    an s3:// directory: its files' sizes and ETags; a local directory: the sha256 of its files;
    a hub id: the id at the revision the hub serves now (offline: the cached revision).
    """
    if storage.is_s3(spec):
        root = spec.rstrip("/")
        found = storage.list_objects(root)
        if not found:
            raise VAEError(f"nothing under the VAE directory {spec!r}: pass a directory holding an AutoencoderKL "
                           "saved with save_pretrained")
        return "s3-etags:" + listing_digest((o.uri[len(root) + 1 :], o.size, o.version) for o in found)
    local = storage.local_path(spec)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        return "sha256:" + listing_digest((p.relative_to(local).as_posix(), p.stat().st_size, file_digest(p))
                                          for p in files)
    return f"{spec}@{_hub_revision(spec)}"


def _hub_revision(repo_id: str) -> str:
    """The commit the hub serves for `repo_id` now, else (offline) the one in the local hub cache."""
    from pathlib import Path

    from huggingface_hub import HfApi, constants

    try:
        return HfApi().model_info(repo_id, timeout=30).sha
    except Exception as error:  # offline, unreachable, unknown id: the cache may still know it
        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
        raise VAEError(f"cannot load the VAE {repo_id!r}: its revision is unknown ({type(error).__name__}: {error}); "
                       "pass a hub id the node can reach, or a local or s3:// directory holding an "
                       "AutoencoderKL saved with save_pretrained") from None

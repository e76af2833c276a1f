"""The Stable Diffusion VAE (diffusers AutoencoderKL): encode writes its moments, sampling decodes with it.

Its own module so that encoding (maskdit.encode) and decoding (maskdit.shards.load_decoder) share
one loader without importing each other.
"""

from __future__ import annotations

import tempfile

import torch

from maskdit import storage
from maskdit.errors import UserError

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

"""Decoding x0 back to images: the manifest's VAE decoder, or the pixels themselves in pixel space."""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskdit.data.shards import Manifest


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (one channel repeated to three)."""
    images = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images.repeat(1, 1, 1, 3) if images.shape[-1] == 1 else images


def load_decoder(manifest: Manifest, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 -> uint8 images (B, H, W, 3): the manifest's VAE decoder, or identity in pixel space."""
    if manifest.space == "pixel":
        return to_uint8_images
    from maskdit.data.vae import load_vae

    vae = load_vae(manifest.vae, device=device)

    @torch.no_grad()
    def decode(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(device=device, dtype=next(vae.parameters()).dtype)
        return to_uint8_images(vae.decode(x0 / manifest.scale_factor).sample).cpu()

    return decode

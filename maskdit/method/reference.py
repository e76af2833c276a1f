"""Convert the public MaskDiT release checkpoints (Anima-Lab/MaskDiT) to our layout and back.

The release saves `{"net": ..., "ema": ..., ...}` where each state dict is that repository's
`EDMPrecond` around its `DiT` (`models/maskdit.py`): keys `model.<module>...`. Our `MaskDiT` uses
the same module names, so most keys map one to one (drop `model.`). The exceptions (the full table
is in docs/reference-checkpoints.md):

- `model.y_embedder.embedding_table.weight` is a bias-free Linear on one-hot labels, (D, K); the
  null class is the all-zero label, whose embedding is 0. Ours is an Embedding table (K + 1, D)
  with the null class in the last row: transpose, append a zero row.
- `model.pos_embed`, `model.decoder_pos_embed` are fixed sin-cos tables; ours are computed, not
  stored. They are checked against ours and dropped.
- `model.mask_token` exists only when the reference trained with an MAE loss; without it the
  reference fills masked places with zeros, so we load zeros.
- `model.final_layer.linear` has p*p*2C outputs for learned-sigma models (`learn_sigma=True`);
  EDM does not use the variance half, so we keep the first C channels of each pixel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from maskdit.core.errors import UserError
from maskdit.method.model import DIT_SIZES, MaskDiT, ModelConfig, sincos_2d

PREFIX = "model."


class ReferenceCheckpointError(UserError, ValueError):
    """A state dict does not have the reference (or our) layout; the message names the keys."""


def reference_state_dict(checkpoint: Mapping[str, Any], which: str = "ema") -> dict[str, torch.Tensor]:
    """The `EDMPrecond` state dict inside a release checkpoint (`which` = "ema" or "net"), or the dict itself."""
    state = checkpoint[which] if which in checkpoint else checkpoint
    if not any(isinstance(k, str) and k.startswith((PREFIX, "module." + PREFIX)) for k in state):
        raise ReferenceCheckpointError(
            f"no {PREFIX!r} keys: expected a MaskDiT release checkpoint ({which!r} entry or an EDMPrecond "
            f"state dict); got keys {sorted(map(str, state))[:5]}..."
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def reference_config(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None, decoder_num_heads: int = 16
) -> ModelConfig:
    """Read a ModelConfig off the tensor shapes; heads are not in the shapes (default: the DiT size's heads)."""
    proj = state[PREFIX + "x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_tokens = state[PREFIX + "pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(PREFIX + "blocks."))
    decoder_keys = [k for k in state if k.startswith(PREFIX + "decoder_blocks.")]
    decoder_depth = 1 + max(int(k.split(".")[2]) for k in decoder_keys) if decoder_keys else 0
    decoder_hidden = state[PREFIX + "decoder_layer.linear.weight"].shape[0] if decoder_depth else 512
    if num_heads is None:
        by_width = {width: heads for _, width, heads in DIT_SIZES.values()}
        if hidden not in by_width:
            raise ReferenceCheckpointError(f"hidden size {hidden} is not a DiT size; pass num_heads")
        num_heads = by_width[hidden]
    return ModelConfig(
        input_size=int(round(num_tokens**0.5)) * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state[PREFIX + "blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=state[PREFIX + "y_embedder.embedding_table.weight"].shape[1],
        decoder_hidden_size=decoder_hidden,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
    )


def _keep_first_channels(t: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Final-layer rows are ordered (row, col, channel) per patch; keep channels [0, C) of 2C."""
    rows = t.reshape(patch * patch, 2 * channels, *t.shape[1:])  # (p*p, 2C, ...)
    return rows[:, :channels].reshape(patch * patch * channels, *t.shape[1:])


def from_reference(
    checkpoint: Mapping[str, Any], cfg: ModelConfig | None = None, which: str = "ema"
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(our MaskDiT state dict, its config) from a release checkpoint or reference EDMPrecond state dict."""
    state = reference_state_dict(checkpoint, which)
    cfg = cfg or reference_config(state)
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        if name in ("pos_embed", "decoder_pos_embed"):
            width = cfg.hidden_size if name == "pos_embed" else cfg.decoder_hidden_size
            fixed = sincos_2d(width, cfg.input_size // cfg.patch_size)[None]  # (1, L, width)
            if value.shape != fixed.shape or not torch.allclose(value.float(), fixed, atol=1e-4):
                raise ReferenceCheckpointError(
                    f"{key} is not the fixed 2-D sin-cos table of shape {tuple(fixed.shape)}"
                )
            continue
        if name == "y_embedder.embedding_table.weight":
            value = torch.cat([value.t(), value.new_zeros(1, value.shape[0])])  # (K + 1, D), null row = 0
        elif name.startswith("final_layer.linear.") and value.shape[0] == 2 * cfg.patch_size**2 * cfg.in_channels:
            value = _keep_first_channels(value, cfg.patch_size, cfg.in_channels)  # drop learned sigma
        ours[name] = value
    if cfg.decoder_depth > 0 and "mask_token" not in ours:
        ours["mask_token"] = torch.zeros(1, 1, cfg.decoder_hidden_size)
    _check_layout(ours, cfg)
    return ours, cfg


def to_reference(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our MaskDiT state dict -> the reference EDMPrecond layout (the null class must embed to 0)."""
    _check_layout(state, cfg)
    ref: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name == "y_embedder.embedding_table.weight":
            if torch.any(value[-1] != 0):
                raise ReferenceCheckpointError(
                    "the null-class row of y_embedder.embedding_table.weight is not zero: the reference layout "
                    "embeds the null label as 0 and cannot hold it; only models with a zero null row convert"
                )
            value = value[:-1].t().contiguous()  # (D, K)
        ref[PREFIX + name] = value
    grid = cfg.input_size // cfg.patch_size
    ref[PREFIX + "pos_embed"] = sincos_2d(cfg.hidden_size, grid)[None]
    if cfg.decoder_depth > 0:
        ref[PREFIX + "decoder_pos_embed"] = sincos_2d(cfg.decoder_hidden_size, grid)[None]
    return ref


def _check_layout(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MaskDiT(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected)
        parts += [f"{k}: {got[k]} != {expected[k]}" for k in wrong]
        raise ReferenceCheckpointError("state dict does not match the model config: " + "; ".join(parts))


def load_reference(
    checkpoint: Mapping[str, Any], cfg: ModelConfig | None = None, which: str = "ema", sigma_data: float = 0.5
):
    """An `EDMPrecond` (eval mode) holding the weights of a release checkpoint (already `torch.load`ed).

    `cfg` defaults to the shapes' config with the DiT size's heads (see `reference_config`).
    """
    from maskdit.method.diffusion import EDMPrecond

    state, cfg = from_reference(checkpoint, cfg, which=which)
    net = MaskDiT(cfg)
    net.load_state_dict(state, strict=True)
    return EDMPrecond(net, sigma_data=sigma_data).eval()

"""The MaskDiT network: a DiT encoder on the kept tokens and a light DiT decoder on all tokens.

Shapes: N batch, C channels, H = W = input_size, p patch size, L = (H/p)^2 tokens,
L_keep = L - floor(r L) kept tokens at mask ratio r, D encoder width, Dd decoder width.

The module names follow the public MaskDiT release (`models/maskdit.py` of Anima-Lab/MaskDiT) so that
its checkpoints map onto ours almost key for key (`maskdit/method/reference.py`, docs/reference-checkpoints.md).
`decoder_depth=0` gives a plain DiT: the final layer then sits on the encoder.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from maskdit.core.config import ConfigError, StrictModel, build_config

#################################################################################
#                                    Config                                     #
#################################################################################


class ModelConfig(StrictModel):
    """Network shape. Defaults: MaskDiT-XL/2 on 256px SD-VAE latents (32x32x4), decoder 8 x 512."""

    input_size: int = Field(32, ge=1)  # H = W of the model's input (latent or pixels)
    in_channels: int = Field(4, ge=1)  # C: 4 for SD-VAE latents, 1 or 3 for pixels
    patch_size: int = Field(2, ge=1)  # p: tokens are p x p patches, L = (H/p)^2
    hidden_size: int = Field(1152, ge=4)  # encoder width D
    depth: int = Field(28, ge=1)  # encoder DiT blocks
    num_heads: int = Field(16, ge=1)  # encoder attention heads
    mlp_ratio: float = Field(4.0, gt=0)  # MLP width / D in every block
    num_classes: int = Field(1000, ge=1)  # class labels 0..n-1; index n is the null class (CFG)
    decoder_hidden_size: int = Field(512, ge=4)  # decoder width Dd (reference: 512)
    decoder_depth: int = Field(8, ge=0)  # 0 = plain DiT (no decoder)
    decoder_num_heads: int = Field(16, ge=1)  # decoder attention heads

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        widths = [("hidden_size", self.hidden_size, "num_heads", self.num_heads)]
        if self.decoder_depth > 0:
            widths.append(
                ("decoder_hidden_size", self.decoder_hidden_size, "decoder_num_heads", self.decoder_num_heads)
            )
        for name, width, heads_name, heads in widths:
            if width % heads:
                problems.append(f"{name} {width} is not a multiple of {heads_name} {heads}")
            if width % 4:
                problems.append(f"{name} {width} must be a multiple of 4 (2-D sin-cos position embedding)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


DIT_SIZES = {  # depth, hidden, heads (DiT Table 1)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "H": (32, 1280, 16),
}

MODEL_PRESETS: dict[str, dict] = {
    f"{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in (2, 4, 8)
}
MODEL_PRESETS.update(
    {
        # CPU unit tests: 8x8x4 input, 16 tokens, ~60k parameters.
        "tiny": dict(
            input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2,
        ),
        # The laptop demo (docs/design.md): 32x32 one-channel MNIST pixels, encoder 4 x 128, decoder 2 x 64, ~1.5M.
        "demo": dict(
            input_size=32, in_channels=1, patch_size=4, hidden_size=128, depth=4, num_heads=4,
            num_classes=10, decoder_hidden_size=64, decoder_depth=2, decoder_num_heads=4,
        ),
    }
)


def model_config(name: str, **overrides) -> ModelConfig:
    """A named preset ("S/2" ... "H/8", "tiny", "demo") with field overrides, e.g. `decoder_depth=0`."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return build_config(ModelConfig, {**MODEL_PRESETS[name], **overrides}, source=f"model preset {name!r}")


#################################################################################
#                       Patches and masking (MAE-style)                         #
#################################################################################


class MaskIndices(NamedTuple):
    """One random masking of a batch: `mask` is 1 where a token is removed (float)."""

    ids_keep: torch.Tensor  # (N, L_keep) long: kept token indices, in shuffled order
    ids_restore: torch.Tensor  # (N, L) long: position of each token in [kept, removed] order
    mask: torch.Tensor  # (N, L) float, 1 = masked


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """floor(r * L), robust to float error (0.29 * 100 counts as 29)."""
    return int(math.floor(mask_ratio * num_tokens + 1e-6))


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskIndices:
    """Per-sample random masking by argsort of uniform noise; keeps the first L - floor(rL)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if device is None and generator is not None:
        device = generator.device
    len_keep = num_tokens - num_masked(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)  # (N, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, L) small noise = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (N, L_keep)
    mask = torch.ones(batch, num_tokens, device=noise.device)  # (N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (N, L) back in token order
    return MaskIndices(ids_keep, ids_restore, mask)


def keep_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(N, L, D) -> (N, L_keep, D): the kept tokens."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, L_keep, D) -> (N, L, D): kept tokens back in place, `fill` (1, 1, D) at the removed places.

    A scatter into the filled (N, L, D) rather than cat + gather: no (N, L - L_keep, D) tensor, whose
    size 0 or 1 would make torch.compile specialise the graph on the mask ratio.
    """
    n, _, d = x.shape
    full = fill.to(x.dtype).expand(n, num_tokens, d)  # (N, L, D)
    return torch.scatter(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x)  # (N, L, D)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), values of a patch ordered (row, col, channel)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)  # (N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // p) * (w // p), p * p * c)  # (N, L, p*p*C)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W) on a square grid of L tokens."""
    n, length, dim = x.shape
    h = w = math.isqrt(length)
    c = dim // (p * p)
    x = x.reshape(n, h, w, p, p, c)  # (N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(n, c, h * p, w * p)  # (N, C, H, W)


#################################################################################
#                    Fixed 2-D sine-cosine position embeddings                  #
#################################################################################


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid^2, dim) for tokens in row-major order; the first half encodes the column, the second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")  # (g, g)
    emb_col = sincos_1d(dim // 2, cols.reshape(-1))  # (L, dim/2)
    emb_row = sincos_1d(dim // 2, rows.reshape(-1))  # (L, dim/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (L, dim)


#################################################################################
#               Embedding layers for noise level and class labels               #
#################################################################################


class TimestepEmbedder(nn.Module):
    """c_noise (N,) -> (N, D): 256 sinusoidal frequencies, then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 256)
        return self.mlp(t_freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class index (N,) -> (N, D); row `num_classes` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                             DiT blocks (adaLN-Zero)                           #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, h, T, d/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, d/h)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block of width `dim` modulated by a condition of width `cond_dim` (adaLN-Zero)."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class ModulatedLinear(nn.Module):
    """LayerNorm, adaLN shift/scale from the condition, then a linear map `dim -> out_dim`.

    Serves as the final layer (out_dim = p*p*C) and as the encoder-to-decoder projection
    (out_dim = Dd, the reference's `decoder_layer`).
    """

    def __init__(self, dim: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, dim)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, out_dim)


#################################################################################
#                                   MaskDiT                                     #
#################################################################################


class MaskDiT(nn.Module):
    """Asymmetric encoder-decoder DiT. `forward` returns the raw network output F_x (N, C, H, W).

    With a mask, the encoder runs on the kept tokens only; the decoder sees all L tokens, a shared
    learnable `mask_token` in the removed places. The decoder blocks and final layer are modulated
    by the encoder's time+class vector c (width D) directly: their adaLN linears map D -> 6 Dd / 2 Dd,
    as in the reference. With `decoder_depth=0` (plain DiT) removed places of F_x are 0.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d, p, grid = cfg.hidden_size, cfg.patch_size, cfg.input_size // cfg.patch_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.register_buffer("pos_embed", sincos_2d(d, grid)[None], persistent=False)  # (1, L, D)
        self.blocks = nn.ModuleList([DiTBlock(d, d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        final_dim = d
        if cfg.decoder_depth > 0:
            dd = cfg.decoder_hidden_size
            self.decoder_layer = ModulatedLinear(d, d, dd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.register_buffer("decoder_pos_embed", sincos_2d(dd, grid)[None], persistent=False)  # (1, L, Dd)
            self.decoder_blocks = nn.ModuleList(
                [DiTBlock(dd, d, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
            )
            final_dim = dd
        self.final_layer = ModulatedLinear(final_dim, d, p * p * cfg.in_channels)
        self.initialize_weights()

    @property
    def has_decoder(self) -> bool:
        return self.config.decoder_depth > 0

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight  # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]  # adaLN-Zero
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)
            zero += [block.adaLN_modulation[-1] for block in self.decoder_blocks]
            zero += [self.decoder_layer.adaLN_modulation[-1], self.decoder_layer.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor, mask: MaskIndices | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens (N, L_keep, D) (all L without a mask) and the condition c (N, D)."""
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, L, D)
        if mask is not None:
            x = keep_tokens(x, mask.ids_keep)  # (N, L_keep, D)
        c = self.t_embedder(c_noise) + self.y_embedder(class_labels)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, L_keep, D)
        return x, c

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor, mask: MaskIndices | None = None
    ) -> torch.Tensor:
        """x (N, C, H, W), c_noise (N,), class_labels (N,) long (null = num_classes) -> F_x (N, C, H, W)."""
        x, c = self.encode(x, c_noise, class_labels, mask)  # (N, L_keep, D), (N, D)
        if self.has_decoder:
            x = self.decoder_layer(x, c)  # (N, L_keep, Dd)
            if mask is not None:
                x = restore_tokens(x, mask.ids_keep, self.mask_token, self.config.num_tokens)  # (N, L, Dd)
            x = x + self.decoder_pos_embed  # (N, L, Dd)
            for block in self.decoder_blocks:
                x = block(x, c)  # (N, L, Dd)
            x = self.final_layer(x, c)  # (N, L, p*p*C)
        else:
            x = self.final_layer(x, c)  # (N, L_keep, p*p*C)
            if mask is not None:
                zeros = x.new_zeros(1, 1, x.shape[-1])
                x = restore_tokens(x, mask.ids_keep, zeros, self.config.num_tokens)  # (N, L, p*p*C)
        return unpatchify(x, self.config.patch_size)  # (N, C, H, W)

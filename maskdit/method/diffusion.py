"""EDM diffusion around MaskDiT: preconditioning, the MaskDiT loss (eq. 6-8), the Heun sampler.

Numbers and names follow EDM (Karras et al. 2022, "Elucidating the design space ...") and the
MaskDiT paper. x0 is data, sigma the noise level, D_x the denoiser output, F_x the raw network output.

Decisions where the paper is silent (they match the public reference, train_utils/loss.py):
- DSM and MAE are means, not sums: per patch the mean over its p*p*C values, per sample the mean
  over the unmasked (DSM) or masked (MAE) patches. Eq. (6)-(7) write squared norms; the means only
  rescale the loss by constants and keep lambda = 0.1 meaningful across model sizes.
- The MAE prediction is the denoiser output D_x (not F_x), compared with the per-patch normalised
  noisy input (x0 + n - mean) / sqrt(var + 1e-6), var unbiased, as in MAE's `norm_pix_loss`.
- Where no patch is masked the MAE term is 0, not 0/0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from pydantic import Field

from maskdit.core.config import StrictModel
from maskdit.method.model import (
    MaskDiT,
    MaskIndices,
    ModelConfig,
    patchify,
    random_masking,
)

SamplerPrecision = Literal["fp32", "bf16", "tf32"]

#################################################################################
#                           EDM preconditioning                                 #
#################################################################################


class EDMPrecond(nn.Module):
    """D_x = c_skip x + c_out F_x(c_in x, c_noise) (EDM Table 1), computed in float32."""

    def __init__(self, net: MaskDiT, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    @property
    def config(self) -> ModelConfig:
        return self.net.config

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor,
        mask: MaskIndices | None = None,
    ) -> torch.Tensor:
        """x (N, C, H, W), sigma (N,) or scalar, class_labels (N,) long -> D_x (N, C, H, W) float32."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)  # (N,) or (1,)
        sigma = sigma.expand(x.shape[0]).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        f_x = self.net(c_in * x, c_noise.flatten(), class_labels, mask)  # (N, C, H, W)
        return c_skip * x + c_out * f_x.to(torch.float32)  # (N, C, H, W)


#################################################################################
#                          MaskDiT loss, eq. (6)-(8)                            #
#################################################################################


class LossOutput(NamedTuple):
    """Per-sample losses (N,): loss = dsm + mae_weight * mae (eq. 8)."""

    loss: torch.Tensor
    dsm: torch.Tensor
    mae: torch.Tensor


def drop_labels(
    class_labels: torch.Tensor, p_uncond: float, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null class `num_classes` with probability p_uncond (CFG training)."""
    drop = torch.rand(class_labels.shape, generator=generator, device=class_labels.device) < p_uncond  # (N,)
    return torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)  # (N,)


def normalize_patches(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, L, P) -> per-patch (x - mean) / sqrt(var + eps), as MAE's norm_pix_loss."""
    mean = tokens.mean(dim=-1, keepdim=True)  # (N, L, 1)
    var = tokens.var(dim=-1, keepdim=True, correction=1 if tokens.shape[-1] > 1 else 0)  # (N, L, 1)
    return (tokens - mean) / (var + eps).sqrt()  # (N, L, P)


def denoising_loss(
    precond: EDMPrecond,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    class_labels: torch.Tensor,
    mask: MaskIndices | None = None,
    mae_weight: float = 0.1,
    sigma_data: float = 0.5,
) -> LossOutput:
    """Eq. (6)-(8) for given noise n (N, C, H, W) of levels sigma (N,) and mask (None = nothing masked)."""
    y = x0 + noise  # (N, C, H, W) noisy input
    d_x = precond(y, sigma, class_labels, mask)  # (N, C, H, W)
    p = precond.config.patch_size
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # (N,) EDM lambda(sigma)
    dsm_patch = patchify((d_x - x0.float()) ** 2, p).mean(dim=-1)  # (N, L)
    if mask is None:
        dsm = weight * dsm_patch.mean(dim=1)  # (N,)
        mae = torch.zeros_like(dsm)  # (N,)
    else:
        masked = mask.mask.to(dsm_patch.dtype)  # (N, L) 1 = masked
        kept = 1 - masked  # (N, L)
        dsm = weight * (dsm_patch * kept).sum(dim=1) / kept.sum(dim=1)  # (N,) eq. (6)
        target = normalize_patches(patchify(y.float(), p))  # (N, L, p*p*C)
        mae_patch = ((patchify(d_x, p) - target) ** 2).mean(dim=-1)  # (N, L)
        mae = (mae_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1)  # (N,) eq. (7)
    return LossOutput(dsm + mae_weight * mae, dsm, mae)  # eq. (8)


def maskdit_loss(
    precond: EDMPrecond,
    x0: torch.Tensor,
    class_labels: torch.Tensor,
    mask_ratio: float,
    mae_weight: float = 0.1,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    loss_fn: Callable[..., LossOutput] = denoising_loss,
) -> LossOutput:
    """Draw sigma = exp(N(p_mean, p_std^2)), n ~ N(0, sigma^2 I), a random mask; return eq. (8) per sample.

    Draw order (with `generator`): sigma (N,), then n (N, C, H, W), then the mask noise (N, L).
    mask_ratio 0 is the plain EDM loss (no mask, MAE term 0). `loss_fn` computes eq. (6)-(8) from the
    draws: `denoising_loss`, or its compiled form (maskdit.method.compiled); the draws stay eager.
    """
    n = x0.shape[0]
    sigma = (torch.randn(n, generator=generator, device=x0.device) * p_std + p_mean).exp()  # (N,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device) * sigma.view(-1, 1, 1, 1)  # (N, C, H, W)
    mask = None
    if mask_ratio > 0:
        mask = random_masking(n, precond.config.num_tokens, mask_ratio, generator=generator, device=x0.device)
    return loss_fn(precond, x0.float(), noise, sigma, class_labels, mask, mae_weight, sigma_data)


#################################################################################
#                      EDM Heun sampler (EDM Algorithm 2)                       #
#################################################################################


class SeededNoise:
    """Per-seed Gaussian noise: row i of every draw depends only on seeds[i] (EDM's StackedRandomGenerator)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 63)) for seed in seeds]
        self.device = device

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )  # (N, ...)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)


class SamplerConfig(StrictModel):
    """How images are sampled (EDM Heun, Algorithm 2): one model, used by sample, evaluate, register and serving.

    Defaults are the paper's FID settings: 40 steps (79 network calls), rho 7, sigma 0.002..80, CFG 1.5,
    and the exact float32 network (precision fp32, not compiled).
    """

    cfg_scale: float = Field(1.5, ge=0.0, description="classifier-free guidance w (1 = none); the paper's FID uses 1.5")
    num_steps: int = Field(40, ge=1, description="EDM Heun steps (2 * num_steps - 1 network calls)")
    sigma_min: float = Field(0.002, gt=0.0, description="smallest noise level")
    sigma_max: float = Field(80.0, gt=0.0, description="largest noise level")
    rho: float = Field(7.0, gt=0.0, description="EDM eq. (5) time-step exponent")
    precision: SamplerPrecision = Field(
        "fp32", description="network arithmetic: fp32 (exact), bf16 (autocast), tf32 (CUDA matmuls and convolutions); "
        "the sampler's own update stays float64. Measure FID before making bf16/tf32 a default"
    )
    compile: bool = Field(False, description="torch.compile the network call (compiled once per batch shape)")

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of `edm_sampler` / `sample_latents`."""
        return self.model_dump()


@contextmanager
def network_precision(precision: SamplerPrecision, device: torch.device | str):
    """The arithmetic of the network calls: fp32 as is, bf16 autocast, or TF32 matmuls (restored after)."""
    device_type = torch.device(device).type
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """EDM eq. (5) noise levels t_0 > ... > t_{N-1} = sigma_min, then t_N = 0: (num_steps + 1,) float64."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_sampler(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    class_labels: torch.Tensor,
    num_steps: int = 40,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    cfg_scale: float = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    null_class: int | None = None,
    precision: SamplerPrecision = "fp32",
    compile: bool = False,
) -> torch.Tensor:
    """Heun's 2nd-order sampler (EDM Algorithm 2) from unit `noise` (N, C, H, W); returns x (N, C, H, W).

    `denoise(x, sigma (N,), class_labels (N,)) -> D_x` (an EDMPrecond fits). With cfg_scale w != 1 the
    conditional and null halves run as one batch of 2N and D = D(x, null) + w (D(x, c) - D(x, null)) on
    all channels; `null_class` defaults to `denoise.config.num_classes`. Churn (s_churn > 0) adds fresh
    noise from `randn_like` (pass SeededNoise.randn_like for per-seed determinism). `precision` and
    `compile` apply to the network calls only (SamplerConfig). The noise levels are Python floats,
    fetched once before the loop, so the loop never waits for the device (no host syncs).
    """
    if cfg_scale != 1.0 and null_class is None:
        null_class = denoise.config.num_classes
    n = noise.shape[0]
    net = torch.compile(denoise) if compile else denoise
    labels = class_labels
    if cfg_scale != 1.0:
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)])  # (2N,)

    def guided(x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = torch.full((labels.shape[0],), t, dtype=torch.float32, device=x.device)  # (N,) or (2N,)
        with network_precision(precision, x.device):
            if cfg_scale == 1.0:
                return net(x.to(torch.float32), sigma, labels).to(torch.float64)  # (N, C, H, W)
            both = net(torch.cat([x, x]).to(torch.float32), sigma, labels).to(torch.float64)  # (2N, C, H, W)
        cond, uncond = both.chunk(2)  # 2 x (N, C, H, W)
        return uncond + cfg_scale * (cond - uncond)  # (N, C, H, W)

    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=noise.device).tolist()  # host floats
    x_next = noise.to(torch.float64) * t_steps[0]  # (N, C, H, W)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * s_noise * randn_like(x_cur)  # Alg. 2 line 6
        d_cur = (x_hat - guided(x_hat, t_hat)) / t_hat  # Alg. 2 line 7
        x_next = x_hat + (t_next - t_hat) * d_cur  # Euler step, line 8
        if i < num_steps - 1:  # 2nd-order correction, lines 9-11
            d_prime = (x_next - guided(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(noise.dtype)


@torch.no_grad()
def sample_latents(
    precond: EDMPrecond,
    class_labels: torch.Tensor,
    seeds: Sequence[int],
    cfg_scale: float = 1.0,
    num_steps: int = 40,
    **sampler_kwargs,
) -> torch.Tensor:
    """Samples x0 (N, C, H, W) float32 for class_labels (N,); sample i depends only on seeds[i] and its label.

    `sampler_kwargs` go to `edm_sampler` (sigma_min, sigma_max, rho, s_churn, precision, compile, ...).
    """
    if len(seeds) != class_labels.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for {class_labels.shape[0]} labels; pass one seed per sample")
    cfg = precond.config
    device = next(precond.parameters()).device
    rng = SeededNoise(seeds, device)
    noise = rng.randn([len(seeds), cfg.in_channels, cfg.input_size, cfg.input_size])  # (N, C, H, W)
    return edm_sampler(
        precond, noise, class_labels.to(device), num_steps=num_steps, cfg_scale=cfg_scale,
        randn_like=rng.randn_like, null_class=cfg.num_classes, **sampler_kwargs,
    )

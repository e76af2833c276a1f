"""EDM preconditioning, the MaskDiT loss (eq. 6-8) and the Heun sampler against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from maskdit.method.diffusion import (
    EDMPrecond,
    LossOutput,
    SeededNoise,
    denoising_loss,
    drop_labels,
    edm_sampler,
    maskdit_loss,
    sample_latents,
)
from maskdit.method.model import MaskDiT, model_config, random_masking


def randomized_precond(name: str = "tiny", seed: int = 0, **overrides) -> EDMPrecond:
    torch.manual_seed(seed)
    net = MaskDiT(model_config(name, **overrides))
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return EDMPrecond(net)


# --- preconditioning ----------------------------------------------------------------


class RecordingNet(nn.Module):
    """Stands in for MaskDiT: records its inputs and returns a fixed F_x."""

    def __init__(self, config, out: torch.Tensor):
        super().__init__()
        self.config, self.out, self.seen = config, out, None

    def forward(self, x, c_noise, class_labels, mask=None):
        self.seen = (x, c_noise, class_labels, mask)
        return self.out


def test_precond_coefficients_are_edm_table_1():
    cfg = model_config("tiny")
    x = torch.randn(2, 4, 8, 8)
    f_x = torch.randn(2, 4, 8, 8)
    net = RecordingNet(cfg, f_x)
    precond = EDMPrecond(net, sigma_data=0.5)
    sigma = torch.tensor([0.3, 7.0])
    d_x = precond(x, sigma, torch.tensor([1, 10]))
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(net.seen[0], x / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    torch.testing.assert_close(d_x, 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * f_x)
    assert precond.config is cfg
    precond(x, 2.0, torch.tensor([1, 2]))  # a scalar sigma serves the whole batch
    torch.testing.assert_close(net.seen[1], torch.full((2,), math.log(2.0) / 4))


# --- loss, eq. (6)-(8) ------------------------------------------------------------------


def transcribed_loss(precond, x0, noise, sigma, labels, mask, mae_weight, sigma_data=0.5):
    """Eq. (6)-(8) written out patch by patch (means over a patch's values and over patches)."""
    p = precond.config.patch_size
    y = x0 + noise
    d_x = precond(y, sigma, labels, mask)
    n, _, h, w = x0.shape
    grid = w // p
    loss, dsm, mae = [], [], []
    for i in range(n):
        weight = (sigma[i] ** 2 + sigma_data**2) / (sigma[i] * sigma_data) ** 2
        dsm_terms, mae_terms = [], []
        for token in range(grid * grid):
            r, c = divmod(token, grid)
            cut = (slice(None), slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
            pred, clean, noisy = d_x[i][cut], x0[i][cut], y[i][cut]
            if mask is None or mask.mask[i, token] == 0:
                dsm_terms.append(weight * ((pred - clean) ** 2).mean())
            else:
                target = (noisy - noisy.mean()) / (noisy.var() + 1e-6).sqrt()
                mae_terms.append(((pred - target) ** 2).mean())
        dsm_i = torch.stack(dsm_terms).mean()
        mae_i = torch.stack(mae_terms).mean() if mae_terms else torch.zeros(())
        dsm.append(dsm_i)
        mae.append(mae_i)
        loss.append(dsm_i + mae_weight * mae_i)
    return torch.stack(loss), torch.stack(dsm), torch.stack(mae)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.5, 0.75])
def test_loss_equals_transcription_of_eq_6_to_8(mask_ratio):
    precond = randomized_precond()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.8, 12.0])
    noise = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    labels = torch.tensor([0, 5, 10])
    mask = random_masking(3, 16, mask_ratio, generator=g) if mask_ratio > 0 else None
    with torch.no_grad():
        got = denoising_loss(precond, x0, noise, sigma, labels, mask, mae_weight=0.1)
        want = transcribed_loss(precond, x0, noise, sigma, labels, mask, mae_weight=0.1)
    assert isinstance(got, LossOutput)
    for a, b in zip(got, want):
        # the same loss summed in another order, float32: ~100 ulps (1e-5)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if mask_ratio > 0:
        assert torch.all(got.mae > 0)


def test_maskdit_loss_draws_sigma_noise_then_mask():
    precond = randomized_precond()
    x0 = torch.randn(4, 4, 8, 8)
    labels = torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        got = maskdit_loss(precond, x0, labels, 0.5, mae_weight=0.3, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        sigma = (torch.randn(4, generator=g) * 1.2 - 1.2).exp()
        noise = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
        mask = random_masking(4, 16, 0.5, generator=g)
        want = denoising_loss(precond, x0, noise, sigma, labels, mask, mae_weight=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_mask_ratio_zero_is_the_plain_edm_loss():
    precond = randomized_precond()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    noise = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        out = denoising_loss(precond, x0, noise, sigma, labels, None)
        d_x = precond(x0 + noise, sigma, labels)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(out.loss, weight * ((d_x - x0) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(out.mae, torch.zeros(3))


@pytest.mark.parametrize("mask_ratio", [0.0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99, 0.999])
def test_no_nan_at_any_mask_ratio(mask_ratio):
    precond = randomized_precond()
    x0 = torch.randn(4, 4, 8, 8)
    out = maskdit_loss(precond, x0, torch.tensor([0, 1, 2, 10]), mask_ratio, generator=torch.Generator().manual_seed(0))
    out.loss.sum().backward()
    assert all(torch.isfinite(t).all() for t in out)
    assert all(torch.isfinite(p.grad).all() for p in precond.parameters() if p.grad is not None)
    if mask_ratio * 16 < 1:  # nothing masked among 16 tokens: the MAE term is 0, not 0/0
        assert torch.equal(out.mae, torch.zeros(4))


def test_no_nan_with_one_value_patches():
    precond = randomized_precond(input_size=4, in_channels=1, patch_size=1)
    out = maskdit_loss(precond, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), 0.5)
    assert all(torch.isfinite(t).all() for t in out)


def test_drop_labels():
    labels = torch.arange(10)
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert torch.equal(drop_labels(labels, 1.0, 10), torch.full((10,), 10))
    dropped = drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, 10, torch.Generator().manual_seed(0))
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01


# --- sampler --------------------------------------------------------------------------


def gaussian_denoiser(mu: torch.Tensor, s: float):
    """Ideal denoiser of N(mu, s^2 I): E[x0 | x0 + n = x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoise(x, sigma, class_labels):
        a = (s**2 / (s**2 + sigma.to(torch.float64) ** 2)).view(-1, 1, 1, 1)
        return mu + a * (x.to(torch.float64) - mu)

    return denoise


def test_heun_sampler_reproduces_a_gaussian_at_40_steps():
    """Mean and spread of N(mu, s^2 I) within 1% at 40 steps (79 calls).

    The variance gets a looser bound: the exact 40-step Heun discretisation of this ODE inflates
    it by 1.96% for s = 0.5 (1.6% at s = 1, 2.4% at s = 0.25; see the affine test below), so
    "variance within 1%" is not reachable by a correct EDM sampler at 40 steps.
    """
    mu, s = 1.0, 0.5
    calls = []
    denoise = gaussian_denoiser(torch.tensor(mu, dtype=torch.float64), s)

    def counted(x, sigma, labels):
        calls.append(x.shape[0])
        return denoise(x, sigma, labels)

    noise = torch.randn(64, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    x = edm_sampler(counted, noise, torch.zeros(64, dtype=torch.long), num_steps=40)
    assert len(calls) == 79  # 40 Heun steps = 79 network calls
    assert abs(x.mean().item() - mu) / mu < 0.01
    assert abs(x.var().item() - s**2) / s**2 < 0.03


def heun_multiplier(num_steps: int, s: float, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> float:
    """Closed form of EDM Algorithm 2 on u' = f(t) u, f(t) = t / (s^2 + t^2) (u = x - mu, ideal denoiser)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = t.tolist() + [0.0]
    f = lambda t: t / (s**2 + t**2)  # noqa: E731
    m = 1.0
    for k in range(num_steps):
        h = t[k + 1] - t[k]
        euler = 1 + h * f(t[k])
        m *= euler if k == num_steps - 1 else 1 + h / 2 * (f(t[k]) + f(t[k + 1]) * euler)
    return m


@pytest.mark.parametrize("num_steps", [18, 40, 256])
def test_heun_sampler_is_exact_on_the_gaussian_ode(num_steps):
    """The sampler is affine here: x = mu + M (sigma_max z - mu) with M the product of Heun steps."""
    mu, s = 1.0, 0.5
    z = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = edm_sampler(gaussian_denoiser(torch.tensor(mu, dtype=torch.float64), s), z,
                    torch.zeros(8, dtype=torch.long), num_steps=num_steps)
    m = heun_multiplier(num_steps, s)
    # the denoiser sees x in float32 (as the network does): agreement to float32 precision
    # one float32 multiply-add at values up to ~80 (ulp 7.6e-6): rtol 1e-6 is ~10 ulps there
    torch.testing.assert_close(x, mu + m * (80.0 * z - mu), rtol=1e-6, atol=1e-6)
    if num_steps == 256:  # converged: the ODE maps N(0, 80^2) onto N(mu (1 - s / sqrt(s^2 + 80^2)), s^2)
        assert abs((80 * m) ** 2 / s**2 - 1) < 1e-3
        assert abs(mu - m * mu - mu * (1 - s / math.hypot(s, 80.0))) < 1e-4


def test_heun_sampler_with_churn_converges_to_the_gaussian():
    """Churn (Alg. 2 lines 4-6) is noisier per step (at 40 steps the variance is +7.7% with s_churn 40);
    at 256 steps it is on target."""
    mu, s = 1.0, 0.5
    rng = SeededNoise(range(64), "cpu")
    noise = rng.randn([64, 1, 32, 32])
    denoise = gaussian_denoiser(torch.tensor(mu, dtype=torch.float64), s)
    x = edm_sampler(denoise, noise, torch.zeros(64, dtype=torch.long), num_steps=256,
                    s_churn=40, s_tmin=0.05, s_tmax=50, randn_like=rng.randn_like)
    assert abs(x.mean().item() - mu) / mu < 0.01
    assert abs(x.var().item() - s**2) / s**2 < 0.02


def test_cfg_reproduces_the_guided_closed_form_mean():
    """Class c: N(mu_c, s^2 I), null class: N(mu_null, s^2 I). The guided denoiser
    D_null + w (D_c - D_null) is then the ideal denoiser of N(mu_null + w (mu_c - mu_null), s^2 I)."""
    s, w, null = 0.5, 1.5, 2
    mus = torch.tensor([-1.0, 1.0, 0.25], dtype=torch.float64)  # class 0, class 1, null
    batches = []

    def denoise(x, sigma, labels):
        batches.append(labels.clone())
        mu = mus[labels].view(-1, 1, 1, 1)
        a = (s**2 / (s**2 + sigma.to(torch.float64) ** 2)).view(-1, 1, 1, 1)
        return mu + a * (x.to(torch.float64) - mu)

    labels = torch.tensor([0, 1] * 32)
    noise = torch.randn(64, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    x = edm_sampler(denoise, noise, labels, cfg_scale=w, null_class=null)
    assert len(batches) == 79 and all(b.shape == (128,) for b in batches)  # one batched forward per call
    assert torch.equal(batches[0], torch.cat([labels, torch.full((64,), null)]))
    for c in (0, 1):
        guided_mu = mus[null] + w * (mus[c] - mus[null])
        got = x[labels == c]
        assert abs(got.mean().item() - guided_mu.item()) / abs(guided_mu.item()) < 0.01
        assert abs(got.var().item() - s**2) / s**2 < 0.03  # see the 40-step note above


@pytest.mark.parametrize("s_churn", [0.0, 10.0])
def test_sample_i_depends_only_on_seed_i(s_churn):
    precond = randomized_precond().eval()
    kwargs = dict(cfg_scale=1.5, num_steps=4, s_churn=s_churn)
    both = sample_latents(precond, torch.tensor([3, 7]), [11, 12], **kwargs)
    alone = sample_latents(precond, torch.tensor([7]), [12], **kwargs)
    again = sample_latents(precond, torch.tensor([7, 3]), [12, 11], **kwargs)
    assert both.shape == (2, 4, 8, 8) and torch.isfinite(both).all()
    # another batch composition changes the CPU matmul blocking (float32), carried through 4 steps with CFG 1.5
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.flip(0), again, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="seeds"):
        sample_latents(precond, torch.tensor([1, 2]), [1])


def test_sampler_loop_never_reads_device_values(monkeypatch):
    """No host syncs in the step loop: no tensor becomes a Python bool or number there (churn and CFG on)."""
    precond = randomized_precond().eval()
    kwargs = dict(cfg_scale=1.5, num_steps=4, s_churn=10.0, s_tmin=0.05, s_tmax=50.0)
    want = sample_latents(precond, torch.tensor([3, 7]), [11, 12], **kwargs)

    def host_sync(*args):
        raise AssertionError("a tensor was read on the host inside the sampler loop")

    for name in ("__bool__", "__float__", "__int__", "item"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    got = sample_latents(precond, torch.tensor([3, 7]), [11, 12], **kwargs)
    monkeypatch.undo()
    assert torch.equal(got, want)


def test_sampler_precision_options():
    """bf16 autocast stays near fp32; tf32 changes nothing on a CPU; fp32 (the default) is the exact path."""
    precond = randomized_precond().eval()
    labels, seeds = torch.tensor([3, 7]), [11, 12]
    fp32 = sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4)
    assert torch.equal(sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4, precision="fp32"), fp32)
    assert torch.equal(sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4, precision="tf32"), fp32)
    bf16 = sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4, precision="bf16")
    assert not torch.equal(bf16, fp32)  # autocast did apply
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the tf32 run


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    """compile=True: inductor's network call gives the eager samples within float tolerance."""
    precond = randomized_precond().eval()
    labels, seeds = torch.tensor([3, 7]), [11, 12]
    eager = sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4)
    compiled = sample_latents(precond, labels, seeds, cfg_scale=1.5, num_steps=4, compile=True)
    # inductor reorders float32 reductions; 4 steps with CFG carry ~1e-6 per call to at most ~1e-5
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)

"""MaskDiT network: configs, parameter counts, masking, encoder isolation, compile and bf16."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from maskdit.core.config import ConfigError, build_config
from maskdit.method.diffusion import EDMPrecond
from maskdit.method.model import (
    MODEL_PRESETS,
    MaskDiT,
    ModelConfig,
    keep_tokens,
    model_config,
    num_masked,
    patchify,
    random_masking,
    restore_tokens,
    unpatchify,
)


def randomized(cfg: ModelConfig, seed: int = 0) -> MaskDiT:
    """A model whose zero-initialised (adaLN-Zero) layers are random, so every path carries signal."""
    torch.manual_seed(seed)
    net = MaskDiT(cfg)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return net


def inputs(cfg: ModelConfig, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    c_noise = torch.randn(n, generator=g)
    labels = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    return x, c_noise, labels


# --- configs and sizes ------------------------------------------------------------


def test_presets_cover_sizes_and_patches():
    for size in ("S", "B", "L", "XL", "H"):
        for patch in (2, 4, 8):
            cfg = model_config(f"{size}/{patch}")
            assert cfg.patch_size == patch
            assert (cfg.decoder_hidden_size, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert {"tiny", "demo"} <= set(MODEL_PRESETS)
    assert model_config("S/2", decoder_depth=0).decoder_depth == 0


def test_unknown_preset_and_bad_shapes_name_the_problem():
    with pytest.raises(ConfigError, match="XXL/2"):
        model_config("XXL/2")
    with pytest.raises(ConfigError, match="num_heads"):
        build_config(ModelConfig, {"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ConfigError, match="patch_size"):
        build_config(ModelConfig, {"input_size": 30, "patch_size": 4})
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'"):
        build_config(ModelConfig, {"hiden_size": 64})
    with pytest.raises(ConfigError, match="decoder_num_heads"):
        model_config("tiny", decoder_num_heads=3)


def count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MaskDiT(cfg).parameters())


def test_parameter_counts_match_the_paper():
    maskdit_xl = count(model_config("XL/2"))
    dit_xl = count(model_config("XL/2", decoder_depth=0))
    assert 725e6 < maskdit_xl < 735e6  # paper: about 730M
    assert abs(dit_xl - 675e6) / 675e6 < 0.005  # DiT-XL/2: 675M (ours without the learned-sigma half)
    assert (maskdit_xl - dit_xl) / dit_xl < 0.09  # decoder < 9% of DiT-XL/2
    assert 1.3e6 < count(model_config("demo")) < 1.7e6  # docs/design.md: the 1.5M CPU demo model


# --- patches and masking ----------------------------------------------------------


def test_patchify_order_and_round_trip():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 4)  # (2, 4, 48)
    assert tokens.shape == (2, 4, 48)
    # token 1 = row 0, column 1; values ordered (row in patch, column in patch, channel)
    assert torch.equal(tokens[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(tokens, 4), x)


@pytest.mark.parametrize("num_tokens", [16, 64, 256])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.29, 0.5, 0.75, 0.99])
def test_masking_removes_floor_r_n_and_restores_order(num_tokens, ratio):
    g = torch.Generator().manual_seed(0)
    m = random_masking(5, num_tokens, ratio, generator=g)
    removed = math.floor(ratio * num_tokens + 1e-6)
    assert removed == num_masked(num_tokens, ratio)
    assert m.ids_keep.shape == (5, num_tokens - removed)
    assert torch.equal(m.mask.sum(1), torch.full((5,), float(removed)))
    for row in range(5):
        kept = set(m.ids_keep[row].tolist())
        assert len(kept) == num_tokens - removed
        assert kept == set(torch.nonzero(m.mask[row] == 0).flatten().tolist())
    x = torch.randn(5, num_tokens, 7)
    fill = torch.full((1, 1, 7), 123.0)
    back = restore_tokens(keep_tokens(x, m.ids_keep), m.ids_keep, fill, num_tokens)
    keep = (m.mask == 0)[..., None]
    assert torch.equal(torch.where(keep, back, x), x)
    assert torch.all(back[~keep.expand_as(back)] == 123.0)


def test_masking_is_random_per_sample_and_reproducible():
    a = random_masking(8, 64, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_masking(8, 64, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask, b.mask)
    assert len({tuple(row.tolist()) for row in a.mask}) == 8
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, 1.0)


def test_encoder_never_sees_a_masked_token():
    cfg = model_config("tiny")
    net = randomized(cfg).eval()
    x, c_noise, labels = inputs(cfg)
    mask = random_masking(x.shape[0], cfg.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    masked_token = int(torch.nonzero(mask.mask[0]).flatten()[0])
    kept_token = int(mask.ids_keep[0, 0])
    grid, p = cfg.input_size // cfg.patch_size, cfg.patch_size

    def perturbed(token: int) -> torch.Tensor:
        row, col = divmod(token, grid)
        out = x.clone()
        out[0, :, row * p:(row + 1) * p, col * p:(col + 1) * p] += 5.0
        return out

    with torch.no_grad():
        enc, _ = net.encode(x, c_noise, labels, mask)
        enc_masked, _ = net.encode(perturbed(masked_token), c_noise, labels, mask)
        enc_kept, _ = net.encode(perturbed(kept_token), c_noise, labels, mask)
        out = net(x, c_noise, labels, mask)
        out_masked = net(perturbed(masked_token), c_noise, labels, mask)
    assert enc.shape == (3, cfg.num_tokens // 2, cfg.hidden_size)
    assert torch.equal(enc, enc_masked)  # the masked patch never reaches the encoder ...
    assert torch.equal(out, out_masked)  # ... nor the decoder (it sees the mask token there)
    assert not torch.allclose(enc[0], enc_kept[0])  # while a kept patch does


def test_mask_token_fills_the_removed_places_and_learns():
    cfg = model_config("tiny")
    net = randomized(cfg)
    x, c_noise, labels = inputs(cfg)
    mask = random_masking(x.shape[0], cfg.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    net(x, c_noise, labels, mask).square().sum().backward()
    assert net.mask_token.grad is not None and net.mask_token.grad.abs().sum() > 0


def test_samples_in_a_batch_do_not_interact():
    cfg = model_config("tiny")
    net = randomized(cfg).eval()
    x, c_noise, labels = inputs(cfg, n=4)
    with torch.no_grad():
        full = net(x, c_noise, labels)
        one = net(x[2:3], c_noise[2:3], labels[2:3])
    # a batch of 4 vs 1 changes the CPU matmul blocking: float32 sums of ~64 terms, ~sqrt(64) * 1.2e-7 a layer; 1e-5 ~ 80 ulps
    torch.testing.assert_close(full[2:3], one, rtol=1e-5, atol=1e-5)


def test_adaln_zero_init_makes_the_network_output_zero():
    cfg = model_config("tiny")
    net = MaskDiT(cfg)
    x, c_noise, labels = inputs(cfg)
    assert torch.equal(net(x, c_noise, labels), torch.zeros_like(x))
    for block in list(net.blocks) + list(net.decoder_blocks):
        assert torch.all(block.adaLN_modulation[-1].weight == 0)
    assert net.pos_embed.shape == (1, cfg.num_tokens, cfg.hidden_size)
    assert "pos_embed" not in net.state_dict()  # fixed, not learned, not stored


def test_plain_dit_is_the_same_code_without_decoder():
    cfg = model_config("tiny", decoder_depth=0)
    net = randomized(cfg).eval()
    assert not any(name.startswith(("decoder", "mask_token")) for name, _ in net.named_parameters())
    x, c_noise, labels = inputs(cfg)
    mask = random_masking(x.shape[0], cfg.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = patchify(net(x, c_noise, labels, mask), cfg.patch_size)  # (N, L, p*p*C)
    assert torch.all(out[mask.mask.bool()] == 0)
    assert torch.all(out[~mask.mask.bool()].abs().sum(-1) > 0)


# --- bf16 autocast and torch.compile --------------------------------------------------


def test_bf16_autocast_forward():
    cfg = model_config("tiny")
    net = randomized(cfg).eval()
    x, c_noise, labels = inputs(cfg)
    mask = random_masking(x.shape[0], cfg.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x, c_noise, labels, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, c_noise, labels, mask)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_training_forward_compiles_without_graph_breaks():
    cfg = model_config("tiny")
    precond = EDMPrecond(randomized(cfg))
    x, _, labels = inputs(cfg)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    mask = random_masking(x.shape[0], cfg.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(precond, fullgraph=True, backend="aot_eager")
    out = compiled(x, sigma, labels, mask)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in precond.named_parameters()}
    precond.zero_grad()
    eager = precond(x, sigma, labels, mask)
    eager.square().mean().backward()
    torch.testing.assert_close(out, eager)
    for name, p in precond.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


# --- the throughput benchmark stays runnable ------------------------------------------


def test_throughput_benchmark_runs_on_a_tiny_config(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--configs", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row.get("mask_ratio") for row in rows] == [0.0, 0.5, None]
    assert all(row["s_per_step"] > 0 and row["gflop_per_step"] > 0 for row in rows[:2])
    assert 0.3 < rows[2]["flop_ratio_0.5_vs_0"] < 1.0
    bench.main(["--configs", "XL/2", "--batch", "2", "--flops-only"])  # meta device: no memory, no time
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 0.45 < rows[2]["flop_ratio_0.5_vs_0"] < 0.6  # paper: a masked step costs about 55% of DiT-XL/2's

"""Release-checkpoint compatibility: the reference layout, built here by name and shape, loads and
gives the outputs of an independent transcription of the reference forward pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit.method.diffusion import EDMPrecond
from maskdit.method.model import MaskDiT, ModelConfig, model_config, random_masking
from maskdit.method.reference import (
    ReferenceCheckpointError,
    from_reference,
    load_reference,
    reference_config,
    to_reference,
)

# --- the reference layout, written out independently of maskdit.method.model -------------------


def mae_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed: meshgrid(w, h), first half from grid[0], second from grid[1]."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def reference_shapes(cfg: ModelConfig, learn_sigma: bool = False, with_mask_token: bool = True) -> dict[str, tuple]:
    """Keys and shapes of the release EDMPrecond(DiT(use_decoder=True)) state dict."""
    d, dd, p, c = cfg.hidden_size, cfg.decoder_hidden_size, cfg.patch_size, cfg.in_channels
    out_c = 2 * c if learn_sigma else c
    mlp, dmlp = int(d * cfg.mlp_ratio), int(dd * cfg.mlp_ratio)
    n_tok = cfg.num_tokens
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (d, cfg.num_classes),
        "pos_embed": (1, n_tok, d),
    }

    def block(prefix, w, wm, cond):
        shapes.update({
            f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
            f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
            f"{prefix}.mlp.fc1.weight": (wm, w), f"{prefix}.mlp.fc1.bias": (wm,),
            f"{prefix}.mlp.fc2.weight": (w, wm), f"{prefix}.mlp.fc2.bias": (w,),
            f"{prefix}.adaLN_modulation.1.weight": (6 * w, cond), f"{prefix}.adaLN_modulation.1.bias": (6 * w,),
        })

    for i in range(cfg.depth):
        block(f"blocks.{i}", d, mlp, d)
    final = d
    if cfg.decoder_depth:
        shapes.update({
            "decoder_pos_embed": (1, n_tok, dd),
            "decoder_layer.linear.weight": (dd, d), "decoder_layer.linear.bias": (dd,),
            "decoder_layer.adaLN_modulation.1.weight": (2 * d, d), "decoder_layer.adaLN_modulation.1.bias": (2 * d,),
        })
        if with_mask_token:
            shapes["mask_token"] = (1, 1, dd)
        for i in range(cfg.decoder_depth):
            block(f"decoder_blocks.{i}", dd, dmlp, d)
        final = dd
    shapes.update({
        "final_layer.linear.weight": (p * p * out_c, final), "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * final, d), "final_layer.adaLN_modulation.1.bias": (2 * final,),
    })
    return {"model." + k: v for k, v in shapes.items()}


def random_reference(cfg: ModelConfig, seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = cfg.input_size // cfg.patch_size
    state = {}
    for key, shape in reference_shapes(cfg, **layout).items():
        if key == "model.pos_embed":
            state[key] = torch.from_numpy(mae_pos_embed(cfg.hidden_size, grid)).float()[None]
        elif key == "model.decoder_pos_embed":
            state[key] = torch.from_numpy(mae_pos_embed(cfg.decoder_hidden_size, grid)).float()[None]
        else:
            state[key] = torch.randn(shape, generator=g) * 0.2
    return state


def reference_forward(sd, cfg, x, sigma, onehot, mask=None, sigma_data=0.5):
    """The reference EDMPrecond + DiT forward, transcribed with plain tensor ops (labels one-hot)."""
    P = lambda name: sd["model." + name]  # noqa: E731
    p, n = cfg.patch_size, x.shape[0]
    s = sigma.view(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    c_noise = (s.log() / 4).flatten()

    h = F.conv2d(c_in * x, P("x_embedder.proj.weight"), P("x_embedder.proj.bias"), stride=p)
    h = h.flatten(2).transpose(1, 2) + P("pos_embed")
    if mask is not None:
        h = torch.stack([h[i, mask.ids_keep[i]] for i in range(n)])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = c_noise[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def lin(z, name):
        return F.linear(z, P(f"{name}.weight"), P(f"{name}.bias"))

    t = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t + onehot @ P("y_embedder.embedding_table.weight").t()  # the null label (all zeros) embeds to 0

    def ln(z):
        return F.layer_norm(z, z.shape[-1:], eps=1e-6)

    def block(z, prefix, heads):
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), f"{prefix}.adaLN_modulation.1").chunk(6, 1)
        a = ln(z) * (1 + sc1[:, None]) + sh1[:, None]
        b, tok, w = a.shape
        q, k, v = lin(a, f"{prefix}.attn.qkv").reshape(b, tok, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // heads), dim=-1) @ v
        z = z + g1[:, None] * lin(att.transpose(1, 2).reshape(b, tok, w), f"{prefix}.attn.proj")
        a = ln(z) * (1 + sc2[:, None]) + sh2[:, None]
        m = F.gelu(lin(a, f"{prefix}.mlp.fc1"), approximate="tanh")
        return z + g2[:, None] * lin(m, f"{prefix}.mlp.fc2")

    def final(z, prefix):
        shift, scale = lin(F.silu(c), f"{prefix}.adaLN_modulation.1").chunk(2, 1)
        return lin(ln(z) * (1 + scale[:, None]) + shift[:, None], f"{prefix}.linear")

    for i in range(cfg.depth):
        h = block(h, f"blocks.{i}", cfg.num_heads)
    h = final(h, "decoder_layer")
    if mask is not None:
        token = sd.get("model.mask_token", torch.zeros(1, 1, h.shape[-1]))
        full = token.expand(n, cfg.num_tokens, h.shape[-1]).clone()
        for i in range(n):
            full[i, mask.ids_keep[i]] = h[i]
        h = full
    h = h + P("decoder_pos_embed")
    for i in range(cfg.decoder_depth):
        h = block(h, f"decoder_blocks.{i}", cfg.decoder_num_heads)
    h = final(h, "final_layer")
    grid = cfg.input_size // p
    out_c = h.shape[-1] // (p * p)
    f_x = torch.einsum("nhwpqc->nchpwq", h.reshape(n, grid, grid, p, p, out_c)).reshape(n, out_c, grid * p, grid * p)
    return c_skip * x + c_out * f_x[:, : cfg.in_channels]


CFG = model_config("tiny", num_classes=5)


def batch(cfg=CFG):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    sigma = torch.tensor([0.02, 1.0, 30.0])
    labels = torch.tensor([0, 4, cfg.num_classes])  # the last one is the null class
    onehot = torch.zeros(3, cfg.num_classes)
    onehot[0, 0] = onehot[1, 4] = 1
    return x, sigma, labels, onehot


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("with_mask_token", [True, False])
def test_reference_layout_loads_and_gives_the_reference_outputs(learn_sigma, with_mask_token):
    ref = random_reference(CFG, learn_sigma=learn_sigma, with_mask_token=with_mask_token)
    precond = load_reference({"ema": ref, "net": {}, "step": 1}, CFG)  # strict load inside
    assert precond.config == CFG
    x, sigma, labels, onehot = batch()
    mask = random_masking(3, CFG.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in (None, mask):
            want = reference_forward(ref, CFG, x, sigma, onehot, m)
            # the transcribed reference computes attention and norms in another op order (float32, outputs O(1-10)): 1e-4
            torch.testing.assert_close(precond(x, sigma, labels, m), want, rtol=1e-4, atol=1e-4)


def test_round_trip_ours_reference_ours_is_identical():
    torch.manual_seed(0)
    net = MaskDiT(CFG)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param))
        net.y_embedder.embedding_table.weight[-1] = 0  # the reference embeds the null label as 0
    ref = to_reference(net.state_dict(), CFG)
    assert {k: tuple(v.shape) for k, v in ref.items()} == reference_shapes(CFG)
    state, cfg = from_reference(ref, CFG)
    assert cfg == CFG
    with pytest.raises(ReferenceCheckpointError, match="num_heads"):
        from_reference(ref)  # a width that is no DiT size: the heads must be given
    back = MaskDiT(cfg)
    back.load_state_dict(state, strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    x, sigma, labels, onehot = batch()
    with torch.no_grad():
        a, b = EDMPrecond(net)(x, sigma, labels), EDMPrecond(back)(x, sigma, labels)
        assert torch.equal(a, b)
        # as above: another op order in float32
        torch.testing.assert_close(a, reference_forward(ref, CFG, x, sigma, onehot), rtol=1e-4, atol=1e-4)


def test_xl2_loads_the_release_layout():
    cfg = model_config("XL/2")
    shapes = reference_shapes(cfg)
    ref = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    grid = cfg.input_size // cfg.patch_size
    ref["model.pos_embed"] = torch.from_numpy(mae_pos_embed(1152, grid)).float()[None]
    ref["model.decoder_pos_embed"] = torch.from_numpy(mae_pos_embed(512, grid)).float()[None]
    state, got = from_reference({"ema": ref})
    assert got == cfg
    with torch.device("meta"):
        net = MaskDiT(cfg)
    net.load_state_dict(state, strict=True, assign=True)
    assert len(state) == len(shapes) - 2  # all but the two fixed position tables


def test_plain_dit_reference_layout_converts():
    cfg = model_config("tiny", num_classes=5, decoder_depth=0)
    ref = random_reference(cfg, learn_sigma=True)
    state, got = from_reference(ref, cfg)
    unused = {"decoder_hidden_size", "decoder_num_heads"}  # no decoder: these do not matter
    assert reference_config(ref, num_heads=2).model_dump(exclude=unused) == cfg.model_dump(exclude=unused)
    MaskDiT(cfg).load_state_dict(state, strict=True)


def test_mismatches_name_the_keys():
    ref = random_reference(CFG)
    ref["model.cls_token"] = torch.zeros(1, 1, CFG.hidden_size)
    with pytest.raises(ReferenceCheckpointError, match="cls_token"):
        from_reference(ref, CFG)
    ref = random_reference(CFG)
    ref["model.pos_embed"] = ref["model.pos_embed"].flip(1)
    with pytest.raises(ReferenceCheckpointError, match="pos_embed"):
        from_reference(ref, CFG)
    with pytest.raises(ReferenceCheckpointError, match="model."):
        from_reference({"ema": {"weight": torch.zeros(1)}})
    net = MaskDiT(CFG)  # random init: the null row is not zero
    with pytest.raises(ReferenceCheckpointError, match="null"):
        to_reference(net.state_dict(), CFG)


def test_reference_config_reads_heads_from_the_dit_size():
    ref = {k: torch.empty(v, device="meta") for k, v in reference_shapes(model_config("B/4")).items()}
    assert reference_config(ref) == model_config("B/4")

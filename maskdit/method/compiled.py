"""torch.compile for training: `compile: off | model | step` of the training config.

- "model": each DiT block and each modulated linear (decoder projection, final layer) is compiled in
  place (regional compilation): adaLN modulation, LayerNorm, the MLP with its GELU and the residual
  gates fuse; attention stays one SDPA kernel. Blocks of one width share one compiled graph, so the
  compile time is that of one block per width, not of the whole depth.
- "step": the whole loss forward (patch embedding, masking gather, encoder, decoder, restore,
  preconditioning, DSM + MAE loss of eq. 6-8) is one graph, its backward one AOTAutograd graph.

Random draws (sigma, noise, mask, labels) stay in eager mode, from the same seeded generators, so
the data and noise of every step are those of an eager run: resume and 1 rank = N ranks hold as
they do eagerly (compiled kernels sum in another order than eager ones: a compiled run matches an
eager run within float tolerance, and itself bitwise on the same machine and thread count).

The mask ratio changes every step in cosine tuning, and with it the kept-token count L_keep. The
token dimension is marked dynamic (`torch._dynamo.maybe_mark_dynamic`) before every call, so one
graph serves every L_keep: compilation happens once per graph (masked, unmasked), not per ratio.
Module names, parameters and the state dict are unchanged (checkpoints are the same files).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn

from maskdit.method.diffusion import LossOutput, denoising_loss
from maskdit.method.model import MaskDiT

CompileMode = Literal["off", "model", "step"]


def _tokens_dynamic(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a compiled `forward(x (N, T, D), c)` so that T is symbolic and x contiguous (one graph for all T)."""

    def call(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the unmasked patch embedding arrives transposed; masked tokens are gathered
        torch._dynamo.maybe_mark_dynamic(x, 1)
        return forward(x, c)  # (N, T, D_out)

    return call


def compile_blocks(net: MaskDiT, backend: str = "inductor") -> MaskDiT:
    """Regional compilation in place: every DiTBlock and ModulatedLinear of `net` runs compiled."""
    regions: list[nn.Module] = [*net.blocks, net.final_layer]
    if net.has_decoder:
        regions += [net.decoder_layer, *net.decoder_blocks]
    for module in regions:
        module.forward = _tokens_dynamic(torch.compile(module.forward, backend=backend))
    return net


def compiled_denoising_loss(backend: str = "inductor") -> Callable[..., LossOutput]:
    """`denoising_loss` as one compiled graph (forward + loss), L_keep symbolic."""
    compiled = torch.compile(denoising_loss, backend=backend)

    def loss(precond, x0, noise, sigma, class_labels, mask=None, *args, **kwargs) -> LossOutput:
        if mask is not None:
            mask = mask._replace(ids_keep=mask.ids_keep.contiguous())  # a slice: contiguous only when L_keep = L
            torch._dynamo.maybe_mark_dynamic(mask.ids_keep, 1)  # (N, L_keep): L_keep varies with the ratio
        return compiled(precond, x0, noise, sigma, class_labels, mask, *args, **kwargs)

    return loss


def training_loss(net: MaskDiT, mode: CompileMode, backend: str = "inductor") -> Callable[..., LossOutput]:
    """The `loss_fn` of `maskdit_loss` for compile mode `mode`; "model" compiles `net`'s blocks in place."""
    if mode == "model":
        compile_blocks(net, backend)
    if mode == "step":
        return compiled_denoising_loss(backend)
    return denoising_loss

"""torch.compile in training (`compile: model | step`, maskdit/method/compiled.py).

The fast tests compile with the "aot_eager" backend: dynamo traces, guards and recompiles exactly as
with inductor, and AOTAutograd builds the backward, but no C++ is generated (seconds instead of
minutes on a 2-core CPU). The slow test runs the trainer with inductor: loss within tolerance of
eager, exact resume, and no graph compiled after the first step of a cosine schedule.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import build, make_data, one_thread, states_equal, tiny_config  # noqa: F401 (fixture)
from torch._dynamo.utils import counters

from maskdit.core import distributed
from maskdit.method import checkpoint
from maskdit.method.compiled import training_loss
from maskdit.method.diffusion import EDMPrecond, maskdit_loss
from maskdit.method.model import MaskDiT, model_config
from maskdit.train.config import MaskConfig
from maskdit.train.loop import Trainer


def graphs() -> int:
    """Frames dynamo has compiled in this process so far (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


def _loss_and_grads(precond, ratio, loss_fn=None):
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (N, C, H, W)
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    kwargs = {"loss_fn": loss_fn} if loss_fn else {}
    out = maskdit_loss(precond, x0, labels, ratio, generator=torch.Generator().manual_seed(2), **kwargs)
    precond.zero_grad(set_to_none=True)
    out.loss.sum().backward()
    return out.loss.detach(), {n: p.grad for n, p in precond.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["model", "step"])
def test_compiled_loss_matches_eager_and_compiles_once_for_all_mask_ratios(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = EDMPrecond(MaskDiT(model_config("tiny")))
    compiled = copy.deepcopy(eager)
    loss_fn = training_loss(compiled.net, mode, backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their keys

    # the graphs: "model" one per block width, for every token count with or without a mask; "step" one
    # masked (L_keep symbolic) and one unmasked (no gather). Without the dynamic marking, torch would
    # compile again at the second token count (and only then make it dynamic).
    for ratio in {"model": (0.5,), "step": (0.5, 0.0)}[mode]:
        _loss_and_grads(compiled, ratio, loss_fn)
    warm = graphs()
    # kept-token counts 9, 12, 14, 15 (one masked: a size-1 dimension), 16 with a mask (nothing masked) and
    # without one (mask ratio 0: the patch embedding's transposed layout),
    # as a cosine schedule passes through them; the first and last ratios of a cosine schedule close the list
    cosine = MaskConfig(ratio=0.5, schedule="cosine")
    ratios = [0.45, 0.25, 0.15, 0.1, 0.01, cosine.ratio_at(1, 10), cosine.ratio_at(8, 10), 0.0]
    for ratio in ratios:
        want_loss, want_grads = _loss_and_grads(eager, ratio)
        got_loss, got_grads = _loss_and_grads(compiled, ratio, loss_fn)
        # inductor fuses and reorders float32 reductions: the loss (one mean) within ~100 ulps (1e-5), the
        # gradients (several reductions deep, some near 0) within 1e-4 relative / 1e-6 absolute
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert graphs() == warm, f"{graphs() - warm} recompilations across mask ratios"


class GraphCounter:
    """Wraps Trainer.train_step: counts the graphs compiled after the first step; can stop the run at a step."""

    def __init__(self, step_fn, stop_at: int | None = None):
        self.step_fn, self.stop_at, self.after_first, self.late = step_fn, stop_at, None, 0

    def __call__(self, step, executor):
        if step == self.stop_at:
            raise Interrupted(step)
        out = self.step_fn(step, executor)
        if self.after_first is None:
            self.after_first = graphs()
        self.late = graphs() - self.after_first
        return out


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_compiled_training_is_close_to_eager_and_resumes_exactly(tmp_path):
    """Inductor (C++ on the CPU), compile=model, cosine tuning: 6 steps straight == 3, stop, resume 3, bitwise."""
    data = make_data(tmp_path / "latents")
    common = dict(steps=6, log_every=1, mask={"ratio": 0.5, "schedule": "cosine"}, **{"checkpoint.every": 3})
    dist = distributed.setup("cpu")

    def run(ck, stop_at=None, **overrides):
        trainer = Trainer(build(tiny_config(data, tmp_path / ck, **common, **overrides)), dist)
        trainer.train_step = counter = GraphCounter(trainer.train_step, stop_at)
        return trainer.run(), counter.late

    eager, _ = run("eager")
    straight, late = run("straight", compile="model")
    assert late == 0, f"{late} graphs compiled after step 0 as the mask ratio fell"
    # after training steps the reordering compounds through Adam (which normalises small gradients' rounding up to
    # a full step): loss 1e-4, weights 1e-3 relative
    torch.testing.assert_close(straight.metrics["loss"], eager.metrics["loss"], rtol=1e-4, atol=1e-6)
    a, b = checkpoint.load_checkpoint(straight.checkpoint), checkpoint.load_checkpoint(eager.checkpoint)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-3, atol=1e-5, msg=name)

    with pytest.raises(Interrupted):
        run("resumed", stop_at=4, compile="model")  # ckpt-3 written, killed during step 4
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path / "resumed"))] == [3]
    resumed, _ = run("resumed", compile="model")
    assert resumed.step == 6
    states_equal(a, checkpoint.load_checkpoint(resumed.checkpoint))

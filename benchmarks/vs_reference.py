"""Our training step (and sampler) against the public reference code (Anima-Lab/MaskDiT), side by side.

    git clone https://github.com/Anima-Lab/MaskDiT /tmp/MaskDiT
    pip install --no-deps --target /tmp/timm-only timm          # timm without its torch/torchvision pins
    python benchmarks/vs_reference.py --reference /tmp/MaskDiT --timm /tmp/timm-only \\
        --config XL/2 --batch 64 --precision bf16 --device cuda --sample-batch 32   # the 1.5x goals

Nothing of the reference is vendored: the path is a checkout. Its model needs timm (PatchEmbed,
Attention, Mlp), and timm imports torchvision, which need not match the installed torch: this script
puts an empty stand-in `torchvision` (and `lmdb`, `einops`, which the reference's sample.py imports
but the sampler does not use) on the module path for this process only, where the real one does not
import; timm comes from --timm (or the environment).

Same config, batch, device, precision and random data for both, in one process; the timed steps
alternate the two implementations (medians), so both see the same machine load. A step is each
codebase's own loss forward (ours: `maskdit_loss`; theirs: `train_utils/loss.py` EDMLoss with
mae_loss_coef 0.1) + backward + torch AdamW (fused on CUDA, foreach on the CPU, for both: the
reference's apex FusedAdam is not assumed installed) + each codebase's EMA update. Sampling
(--sample-batch): each codebase's EDM Heun sampler, CFG 1.5, --sample-steps steps. Prints one JSON object;
`speedup` = reference seconds / our seconds (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.abc
import importlib.machinery
import json
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sampling  # noqa: E402
from throughput import DTYPES, Step, sync, time_interleaved  # noqa: E402

from maskdit.method.model import model_config  # noqa: E402


class _Anything(type):
    """A class whose every attribute is another such class (one per name, so `Mode.A != Mode.B`): enough for
    the import-time uses of a stand-in module (enum members as dict keys, base classes, defaults)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Anything(name, (), {})
        setattr(cls, name, value)
        return value


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for `names` and their submodules (timm's torchvision imports, sample.py's lmdb)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: getattr(_Anything(spec.name, (), {}), name)  # dunders: AttributeError
        module.__version__ = "0.0.0+stand-in"
        return module

    def exec_module(self, module):
        pass


def import_reference(root: str, timm_dir: str | None):
    """(models.maskdit, train_utils.loss, train_utils.helper, sample) of the checkout at `root`."""
    missing = []
    for name in ("torchvision", "lmdb", "einops"):  # einops: the reference's autoencoder.py, imported by sample.py
        try:
            importlib.import_module(name)
        except Exception:  # absent, or built for another torch
            sys.modules.pop(name, None)
            missing.append(name)
    sys.meta_path.insert(0, _StandIn(tuple(missing)))
    if timm_dir:
        sys.path.insert(0, timm_dir)
    sys.path.insert(0, root)
    import models.maskdit as ref_model  # noqa: PLC0415  (from the checkout)
    import sample as ref_sample
    import train_utils.helper as ref_helper
    import train_utils.loss as ref_loss

    return ref_model, ref_loss, ref_helper, ref_sample


class ReferenceStep:
    """The reference's training step on the same data as our `Step`."""

    def __init__(self, ref, name: str, ours: Step, dtype: torch.dtype | None):
        ref_model, ref_loss, ref_helper, _ = ref
        cfg = model_config(name)
        size = name.split("/")[0]
        self.dtype, self.device, self.helper = dtype, ours.device, ref_helper
        torch.manual_seed(0)
        self.precond = ref_model.EDMPrecond(
            img_resolution=cfg.input_size, img_channels=cfg.in_channels, num_classes=cfg.num_classes,
            model_type=f"DiT-{size}/{cfg.patch_size}", use_decoder=cfg.decoder_depth > 0, mae_loss_coef=0.1,
        ).to(ours.device)
        # its loss reads `net.module.model` (it assumes a DDP wrapper); DataParallel on one device (or none)
        # is that shape and calls the module directly
        ids = [ours.device.index or 0] if ours.device.type == "cuda" else None
        self.net = torch.nn.DataParallel(self.precond, device_ids=ids).train()
        self.ema = copy.deepcopy(self.precond).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.precond.parameters(), lr=1e-4, weight_decay=0.0,
                                     **_adamw_impl(ours.device))
        self.loss = ref_loss.EDMLoss()
        self.x0 = ours.x0
        self.labels = torch.nn.functional.one_hot(ours.labels, cfg.num_classes).float()  # the reference's labels

    def __call__(self, mask_ratio: float) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.loss(net=self.net, images=self.x0, labels=self.labels, mask_ratio=mask_ratio,
                             mae_loss_coef=0.1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.helper.update_ema(self.ema, self.precond)


def _adamw_impl(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="path to a checkout of Anima-Lab/MaskDiT")
    parser.add_argument("--timm", default=None, help="a folder holding timm (pip install --no-deps --target DIR timm)")
    parser.add_argument("--config", default="S/2", help="model preset of both (S/2 ... XL/2: the reference's sizes)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mask-ratios", default="0.5,0", help="timed mask ratios, comma-separated")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="autocast dtype of both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sample-batch", type=int, default=0, help="also time both samplers on this batch (0: no)")
    parser.add_argument("--sample-steps", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    ref = import_reference(args.reference, args.timm)

    ours = Step(args.config, args.batch, device, dtype)
    ours.opt = torch.optim.AdamW(ours.params, lr=1e-4, weight_decay=0.0, **_adamw_impl(device))
    theirs = ReferenceStep(ref, args.config, ours, dtype)
    result = {"config": args.config, "batch": args.batch, "precision": args.precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "params_m": {"ours": round(sum(p.numel() for p in ours.params) / 1e6, 2),
                           "reference": round(sum(p.numel() for p in theirs.precond.parameters()) / 1e6, 2)},
              "train": []}
    for ratio in (float(r) for r in args.mask_ratios.split(",")):
        for _ in range(args.warmup):
            ours(ratio)
            theirs(ratio)
        times = time_interleaved({"ours": lambda: ours(ratio), "reference": lambda: theirs(ratio)}, args.steps, device)
        mine, other = statistics.median(times["ours"]), statistics.median(times["reference"])
        result["train"].append({"mask_ratio": ratio, "ours_s_per_step": round(mine, 5),
                                "reference_s_per_step": round(other, 5), "ours_img_per_s": round(args.batch / mine, 2),
                                "reference_img_per_s": round(args.batch / other, 2), "speedup": round(other / mine, 3)})
    if args.sample_batch:
        result["sample"] = sample_both(ref, ours, theirs, args, device, dtype)
    print(json.dumps(result), flush=True)
    return result


def sample_both(ref, ours: Step, theirs: ReferenceStep, args, device: torch.device, dtype) -> dict:
    """Each codebase's Heun sampler with CFG 1.5 on the same batch size (the same autocast around both)."""
    ref_sample = ref[3]
    ours.precond.eval()
    theirs.precond.eval()
    cfg = ours.cfg
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    mine = sampling.sampler_fn(ours.precond, args.sample_batch, args.sample_steps, 1.5, precision)
    latents = torch.randn(args.sample_batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    labels = torch.nn.functional.one_hot(torch.arange(args.sample_batch, device=device) % cfg.num_classes,
                                         cfg.num_classes).float()

    def other():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return ref_sample.edm_sampler(theirs.precond, latents, labels, cfg_scale=1.5, num_steps=args.sample_steps)

    mine(), other()  # warm-up
    sync(device)
    times = time_interleaved({"ours": mine, "reference": other}, max(args.steps // 2, 1), device)
    a, b = statistics.median(times["ours"]), statistics.median(times["reference"])
    return {"batch": args.sample_batch, "steps": args.sample_steps, "cfg_scale": 1.5,
            "ours_img_per_s": round(args.sample_batch / a, 3), "reference_img_per_s": round(args.sample_batch / b, 3),
            "speedup": round(b / a, 3)}


if __name__ == "__main__":
    main()

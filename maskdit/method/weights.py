"""The checks every load of MaskDiT weights passes, in one place, and the registered model's weights file.

Every path that turns a file into a network calls in here: training checkpoints
(`checkpoint.load_checkpoint`, so `resume`, `checkpoint.resume_from`, `init_from`, evaluate and
sample), registered models (`maskdit.method.modelformat`, so warm starts from `models:/`, sampling,
evaluation and the pyfunc model `mlflow models serve` loads). A file is input like any other: whoever
can write a model version or a checkpoint folder, or a bit flip in the store, decides what it holds.
So, before anything is allocated for the network:
- the model config is validated (pydantic, strict) and bounded by the file: its lower bound of
  parameters (`min_parameters`) must not exceed the tensors the file holds, its block counts must be
  the file's, its token count at most MAX_TOKENS; a crafted `depth: 1000000` is refused in
  microseconds instead of building a 21 GB network;
- the network is then built on the meta device (no memory) and every tensor name and shape of the
  file compared with it;
- after loading, a NaN or inf weight refuses the file;
- a registered model's files are checked against the sha256 recorded at registration (`check_digest`).

The registered model's weights (`save_ema` / `read_ema`): the EMA network only, in bfloat16
safetensors (WEIGHTS_DTYPE; bf16 keeps fp32's exponent range, so no weight overflows or flushes to
zero, and halves the file; docs/benchmarks.md has the FID with fp32, bf16 and fp16 weights), with the
model config, step and training config as JSON in the safetensors header. safetensors reads the
header first and refuses offsets beyond the file, so a tensor declared 16 GiB in a small file is
refused before any allocation; nothing is unpickled. Loading upcasts to float32.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from maskdit.core.errors import UserError
from maskdit.method.model import ModelConfig

WEIGHTS_DTYPE = torch.bfloat16  # the registered model's weights
MAX_TOKENS = 65_536  # (input_size / patch_size)^2: 256 x 256 tokens, 64x the XL/2 ImageNet-512 model's
_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.")


class WeightsError(UserError, ValueError):
    """Weights that do not fit their config, are not finite, or are not the registered bytes; names the file."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_digest(path: str | Path, expected: str, what: str) -> None:
    """WeightsError (one line naming `what` and both digests) unless the file's sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{what}: sha256 {actual} but {expected} was recorded at registration; the stored file "
                           "was altered or damaged: register the model again from its checkpoint")


def model_config_of(raw: Any, uri: str) -> ModelConfig:
    """The file's `model_config`, validated; one line naming the file and the first problem."""
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "model_config"
        raise WeightsError(f"{uri}: its model_config is invalid ({where}: {first['msg']}); not a maskdit model, "
                           "or an altered one") from None


def min_parameters(cfg: ModelConfig) -> int:
    """A lower bound of the network's parameter count from its config alone (per block: qkv 3D^2, proj D^2,
    MLP 2rD^2, adaLN 6D^2; the label table (classes+1)D)."""
    per_block = 10 + 2 * cfg.mlp_ratio
    return int(cfg.depth * per_block * cfg.hidden_size ** 2
               + cfg.decoder_depth * per_block * cfg.decoder_hidden_size ** 2
               + (cfg.num_classes + 1) * cfg.hidden_size)


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], uri: str) -> None:
    """WeightsError unless the tensors named in `shapes` are exactly the network `cfg` describes.

    Bounds first (nothing is built for a config the file cannot hold), then a build on the meta device.
    """
    from maskdit.method.model import MaskDiT

    held = sum(_numel(s) for s in shapes.values())
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    blocks = {"blocks": set(), "decoder_blocks": set()}
    for name in shapes:
        match = _BLOCK.match(name)
        if match:
            blocks[match[1]].add(int(match[2]))
    counts = {"depth": (cfg.depth, len(blocks["blocks"])), "decoder_depth": (cfg.decoder_depth,
                                                                              len(blocks["decoder_blocks"]))}
    wrong = [f"{k} {ours} but the file has {theirs} blocks" for k, (ours, theirs) in counts.items() if ours != theirs]
    if tokens > MAX_TOKENS:
        wrong.append(f"{tokens} tokens (input_size {cfg.input_size} / patch_size {cfg.patch_size}, squared) exceed "
                     f"{MAX_TOKENS}")
    if min_parameters(cfg) > held:
        wrong.append(f"the config needs at least {min_parameters(cfg):,} parameters and the file holds {held:,}")
    if wrong:
        raise WeightsError(f"{uri}: its model_config does not describe its weights ({'; '.join(wrong)}); not a "
                           "maskdit model of this shape, or an altered one")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MaskDiT(cfg).state_dict().items()}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    differ = [f"{k} {tuple(shapes[k])} != {expected[k]}" for k in expected if k in shapes
              and tuple(shapes[k]) != expected[k]]
    if missing or extra or differ:
        found = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + \
                ([f"shapes {differ[:3]}"] if differ else [])
        raise WeightsError(f"{uri}: its weights do not fit its model_config ({'; '.join(found)}); not a maskdit "
                           "model of this shape, or an altered one")


def check_finite(state_dict: dict[str, torch.Tensor], uri: str, what: str = "weights") -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{uri}: {len(bad)} {what} tensor(s) hold NaN or inf ({', '.join(bad[:3])}); refusing "
                           "to load them: use an earlier checkpoint, or register the model again")


def check_state(state: dict[str, Any], uri: str) -> ModelConfig:
    """The checks on a loaded checkpoint dict (training or format-1 registered): config, shapes of `model` and
    `ema`, finiteness; returns the validated config."""
    cfg = model_config_of(state["model_config"], uri)
    for key in ("model", "ema"):
        weights = state[key]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise WeightsError(f"{uri}: its {key} is not a dict of tensors; not a maskdit checkpoint")
        check_shapes(cfg, {k: tuple(v.shape) for k, v in weights.items()}, f"{uri} ({key})")
        check_finite(weights, uri, key)
    return cfg


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= int(size)
    return n


# ------------------------------------------------------------------------------------------
# The registered model's weights: EMA only, bfloat16 safetensors
# ------------------------------------------------------------------------------------------


def save_ema(path: str | Path, ema: dict[str, torch.Tensor], *, model_config: dict[str, Any], step: int,
             train_config: dict[str, Any] | None) -> Path:
    """Write the EMA weights as WEIGHTS_DTYPE safetensors with the config, step and training config in the header."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", WEIGHTS_DTYPE).contiguous() for k, v in ema.items()}  # one file, no sharing
    save_file(tensors, str(path), metadata={"model_config": json.dumps(model_config), "step": str(int(step)),
                                            "train_config": json.dumps(train_config or {})})
    return Path(path)


def read_ema(path: str | Path, uri: str) -> dict[str, Any]:
    """A checked checkpoint-like state (`model_config`, `model` = `ema` in float32, `step`, `train_config`) from a
    file `save_ema` wrote; WeightsError (one line) for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
            if "model_config" not in meta or "step" not in meta:
                raise WeightsError(f"{uri}: its safetensors header has no model_config/step; not registered by "
                                   "maskdit")
            cfg = model_config_of(json.loads(meta["model_config"]), uri)
            if not dtypes <= {"BF16", "F16", "F32"}:
                raise WeightsError(f"{uri}: tensors of type {sorted(dtypes)}; expected BF16 weights")
            check_shapes(cfg, shapes, uri)
            ema = {k: f.get_tensor(k).float() for k in shapes}
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors and json raise several kinds on a damaged header
        raise WeightsError(f"{uri} is not a readable safetensors weights file: {error}") from None
    check_finite(ema, uri, "EMA")
    try:
        step, train_config = int(meta["step"]), json.loads(meta.get("train_config") or "{}")
    except ValueError as error:
        raise WeightsError(f"{uri}: its header's step or train_config is unreadable ({error})") from None
    return {"format_version": 1, "model_config": cfg.model_dump(), "model": ema, "ema": ema, "step": step,
            "train_config": train_config, "optimizer": None, "scaler": None}


def ema_precond(state: dict[str, Any], uri: str, device: str | torch.device = "cpu"):
    """(EDMPrecond with the checked EMA weights, in eval mode, ModelConfig) from a state `check_state` passes."""
    from maskdit.method.diffusion import EDMPrecond
    from maskdit.method.model import MaskDiT

    cfg = model_config_of(state["model_config"], uri)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in state["ema"].items()}, uri)
    net = MaskDiT(cfg)
    net.load_state_dict(state["ema"])
    return EDMPrecond(net).to(device).eval().requires_grad_(False), cfg

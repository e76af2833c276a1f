"""Training checkpoints: one `torch.save` dict per step, written atomically through `maskdit.core.storage`.

Layout of `<dir>/ckpt-<step:09d>.pt` (everything loads with `torch.load(weights_only=True)`):

    format_version  int
    model_config    dict (ModelConfig fields)
    model, ema      state dicts of the MaskDiT network (EMA in float32)
    optimizer       AdamW state dict (None in an inference-only export)
    scaler          GradScaler state dict (fp16) or None
    step            optimizer steps done
    rng             {"torch": ByteTensor, "cuda": [ByteTensor, ...]}
    data_position   {"epoch", "batch_in_epoch", "samples_seen", "dataset_size", "global_batch"}
    skipped_steps   non-finite steps skipped so far
    tracking_run_id MLflow run of this training (resumed after a preemption) or None
    init_from       the warm start's source as resolved (warmstart.InitSource fields) or None
    resumed_from    the other run's checkpoint this run continued (checkpoint.resume_from) or None
    train_config    dict (TrainConfig, JSON-able)

A writer killed mid-write leaves only a hidden `.partial` file (storage's atomic put); the
previous checkpoint stays valid, and the next save removes the file. A full disk or a file-size
limit is a `CheckpointError` (permanent: restarting cannot help) naming the room needed. Readers take the newest checkpoint that loads and skip corrupt ones;
a folder whose checkpoints all fail to load is an error, never an empty folder (training would
otherwise start over at step 0 next to them). Pruning only deletes checkpoints older than the
one just written, so a newer, unreadable file is left for a person to look at.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from maskdit.core import storage
from maskdit.core.errors import UserError
from maskdit.method.model import ModelConfig

FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt-(\d+)\.pt$")
_REQUIRED = ("format_version", "model_config", "model", "ema", "step")
log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or not ours; the message names the URI."""


class ModelMismatchError(UserError, ValueError):
    """The config's model differs from the checkpoint's; the message names both shapes."""


def checkpoint_uri(dir_uri: str, step: int) -> str:
    return storage.join(dir_uri, f"ckpt-{step:09d}.pt")


def list_checkpoints(dir_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint under `dir_uri` (not recursive), oldest first."""
    found = []
    for uri in storage.list_uris(dir_uri):
        match = _NAME.search(uri)
        if match and _parent(uri) == _parent(checkpoint_uri(dir_uri, 0)):
            found.append((int(match.group(1)), uri))
    return sorted(found)


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(storage.local_path(uri).resolve().parent)


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(dir_uri: str, state: dict[str, Any], keep_last: int | None = None) -> str:
    """Write `state` as `<dir>/ckpt-<step>.pt` atomically, then drop all but the newest `keep_last`."""
    for key in ("model", "ema"):
        bad = nonfinite_tensors(state[key])
        if bad:
            raise CheckpointError(f"refusing to save step {state['step']}: {key} tensors {bad[:5]} are not finite")
    uri = checkpoint_uri(dir_uri, state["step"])
    for stale in storage.remove_partials(dir_uri, "ckpt-*.pt"):  # a writer killed mid-write (SIGKILL) left it
        log.info("removed %s, left by a checkpoint write that was killed", stale)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    size = buffer.tell()
    buffer.seek(0)
    try:
        storage.put_fileobj(buffer, uri)
    except storage.NoSpaceError as error:
        kept = (keep_last or 1) + 1
        raise CheckpointError(
            f"{error} (the checkpoint of step {state['step']} is {size / 2**20:.1f} MiB): checkpoint.dir needs room "
            f"for checkpoint.keep_last + 1 = {kept} checkpoints, about {kept * size / 2**20:.1f} MiB (the newest is "
            "written before the oldest is deleted); free space, raise the quota or file-size limit, or lower "
            "checkpoint.keep_last") from None
    if keep_last is not None:
        older = [old for step, old in list_checkpoints(dir_uri) if step < state["step"]]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            storage.delete(old)
    return uri


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint with `weights_only=True`; `CheckpointError` when it is unreadable or foreign."""
    try:
        if storage.is_s3(uri):
            source: Any = io.BytesIO(storage.get_bytes(uri))
        else:
            source = storage.local_path(uri)
            if not source.is_file():
                raise storage.ObjectNotFound(f"cannot read {uri}: no such file")
        state = torch.load(source, map_location=map_location, weights_only=True)
    except storage.StorageError as error:
        raise CheckpointError(f"checkpoint {uri}: {error}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds on a truncated or foreign file
        raise CheckpointError(f"checkpoint {uri} is corrupt or not a torch checkpoint: {error}") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {uri} lacks {missing}; is it a maskdit training checkpoint?")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {uri} has format_version {state['format_version']}, newer than this maskdit's "
            f"{FORMAT_VERSION}; upgrade maskdit"
        )
    return state


def load_latest(dir_uri: str, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint under `dir_uri` that loads, as (uri, state); corrupt ones are reported and skipped.

    None when the folder holds no checkpoint; `CheckpointError` naming every file when it holds
    checkpoints and none of them loads.
    """
    found = list_checkpoints(dir_uri)
    failures = []
    for _, uri in reversed(found):
        try:
            return uri, load_checkpoint(uri, map_location)
        except CheckpointError as error:
            log.warning("skipping unreadable checkpoint: %s", error)
            reason = " ".join(str(error).replace(uri, "it").split())  # one line
            failures.append(f"{uri.rsplit('/', 1)[-1]} ({reason[:160]})")
    if found:
        raise CheckpointError(
            f"{dir_uri} holds {len(found)} checkpoint(s) and none loads: {'; '.join(failures)}. Refusing to "
            "start over at step 0 next to them: move them away (e.g. into a subfolder) to start fresh, or "
            "point checkpoint.dir at another folder"
        )
    return None


def latest_checkpoint(dir_uri: str) -> str | None:
    """URI of the newest valid checkpoint under `dir_uri`, or None."""
    found = load_latest(dir_uri)
    return found[0] if found else None


def resolve(uri: str, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]]:
    """A checkpoint file URI, or a folder URI (its newest valid checkpoint) -> (uri, state)."""
    if _NAME.search(str(uri)) or storage.exists(uri):
        return uri, load_checkpoint(uri, map_location)
    found = load_latest(uri, map_location)
    if found is None:
        raise CheckpointError(f"no valid checkpoint at {uri}: pass a ckpt-<step>.pt file or a folder holding one")
    return found


def check_model_config(expected: ModelConfig, state: dict[str, Any], uri: str) -> None:
    """Refuse a checkpoint whose network differs from `expected`, naming both shapes."""
    theirs = state["model_config"]
    ours = expected.model_dump()
    if theirs != ours:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ModelMismatchError(
            f"the config's model does not match checkpoint {uri} (fields {diff}):\n"
            f"  config:     {ours}\n  checkpoint: {theirs}\n"
            "set model to the checkpoint's shape, or point checkpoint.dir / init_from elsewhere"
        )


def load_ema_model(uri: str, device: str | torch.device = "cpu"):
    """(EDMPrecond with the EMA weights in eval mode, ModelConfig, meta) from a checkpoint file or folder."""
    from maskdit.method.diffusion import EDMPrecond
    from maskdit.method.model import MaskDiT

    uri, state = resolve(uri)
    cfg = ModelConfig(**state["model_config"])
    net = MaskDiT(cfg)
    net.load_state_dict(state["ema"])
    precond = EDMPrecond(net).to(device).eval().requires_grad_(False)
    meta = {
        "uri": uri,
        "step": state["step"],
        "format_version": state["format_version"],
        "train_config": state.get("train_config"),
    }
    return precond, cfg, meta

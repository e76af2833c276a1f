"""Training checkpoints: finding, loading and pruning them, in either of two formats.

- sharded (format_version 2, what training writes): a folder `<dir>/ckpt-<step:09d>/` of one shard a
  rank and a commit marker (maskdit/method/sharded.py); a folder without its marker is an upload in
  flight or abandoned, not a checkpoint;
- one file (format_version 1, what earlier versions wrote, `checkpoint.format: file`): one `torch.save`
  dict, `<dir>/ckpt-<step:09d>.pt`, written atomically through `maskdit.core.storage`.

Both load into the same dict (everything loads with `torch.load(weights_only=True)`):

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

A writer killed mid-write leaves only a hidden `.partial` file (storage's atomic put; the next
file save removes it) or a folder without a commit marker; the previous checkpoint stays valid.
A full disk or a file-size limit is a `CheckpointError` (permanent: restarting cannot help) naming
the room needed. Readers take the newest checkpoint that loads and skip corrupt ones;
a folder whose checkpoints all fail to load is an error, never an empty folder (training would
otherwise start over at step 0 next to them). Pruning only deletes checkpoints older than the
one just written, so a newer, unreadable file is left for a person to look at.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from typing import Any

import torch

from maskdit.core import storage
from maskdit.core.errors import UserError
from maskdit.method import sharded, weights
from maskdit.method.model import ModelConfig

FORMAT_VERSION = sharded.FORMAT_VERSION  # the newest this code reads
FILE_FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt-(\d+)\.pt$")
_FOLDER = re.compile(r"ckpt-(\d+)/?$")
_MARKER = re.compile(r"ckpt-(\d+)/" + re.escape(sharded.COMMIT) + "$")
_REQUIRED = ("format_version", "model_config", "model", "ema", "step")
log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or not ours; the message names the URI."""


class ModelMismatchError(UserError, ValueError):
    """The config's model differs from the checkpoint's; the message names both shapes."""


def checkpoint_uri(dir_uri: str, step: int, fmt: str = "sharded") -> str:
    """URI of step's checkpoint: the folder `ckpt-<step>` (sharded) or the file `ckpt-<step>.pt` (file)."""
    return storage.join(dir_uri, f"ckpt-{step:09d}" + (".pt" if fmt == "file" else ""))


def list_checkpoints(dir_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint in `dir_uri`: files, and folders with a commit marker; oldest first."""
    return sorted(found for found, committed in _scan(dir_uri) if committed)


def uncommitted(dir_uri: str) -> list[tuple[int, str]]:
    """(step, folder uri) of sharded checkpoints whose upload did not finish (no commit marker), oldest first."""
    return sorted(found for found, committed in _scan(dir_uri) if not committed)


def _scan(dir_uri: str) -> list[tuple[tuple[int, str], bool]]:
    """((step, uri), committed) of every file checkpoint and checkpoint folder directly in `dir_uri`."""
    files, folders, markers = [], {}, set()
    top = _parent(checkpoint_uri(dir_uri, 0, "file"))
    for uri in storage.list_uris(dir_uri):
        match = _NAME.search(uri)
        if match and _parent(uri) == top:
            files.append(((int(match.group(1)), uri), True))
            continue
        folder = uri.rsplit("/", 1)[0]
        match = _FOLDER.search(folder)
        if match and _parent(folder) == top:
            folders[folder] = int(match.group(1))
            if _MARKER.search(uri):
                markers.add(folder)
    return files + [((step, folder), folder in markers) for folder, step in folders.items()]


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(storage.local_path(uri).resolve().parent)


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state: dict[str, Any]) -> None:
    """Refuse to save non-finite model or EMA weights."""
    for key in ("model", "ema"):
        bad = nonfinite_tensors(state[key])
        if bad:
            raise CheckpointError(f"refusing to save step {state['step']}: {key} tensors {bad[:5]} are not finite")


def save_checkpoint(dir_uri: str, state: dict[str, Any], keep_last: int | None = None) -> str:
    """Write `state` as the one file `<dir>/ckpt-<step>.pt` atomically (format 1, `checkpoint.format: file`),
    then drop all but the newest `keep_last`. Builds the whole file in memory first."""
    check_finite(state)
    uri = checkpoint_uri(dir_uri, state["step"], "file")
    for stale in storage.remove_partials(dir_uri, "ckpt-*.pt"):  # a writer killed mid-write (SIGKILL) left it
        log.info("removed %s, left by a checkpoint write that was killed", stale)
    buffer = io.BytesIO()
    torch.save({"format_version": FILE_FORMAT_VERSION, **state}, buffer)
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
        prune(dir_uri, state["step"], keep_last)
    return uri


def prune(dir_uri: str, newest: int, keep_last: int) -> None:
    """Keep `keep_last` checkpoints up to step `newest`: delete older ones, and uncommitted folders before it."""
    older = [old for step, old in list_checkpoints(dir_uri) if step < newest]
    doomed = older[: max(len(older) - (keep_last - 1), 0)] + [f for step, f in uncommitted(dir_uri) if step < newest]
    for old in doomed:
        if _NAME.search(old):
            storage.delete(old)
        else:  # a folder: the marker first, so that a crash halfway leaves no committed half checkpoint
            objects = storage.list_uris(old)
            for uri in sorted(objects, key=lambda u: not u.endswith(sharded.COMMIT)):
                storage.delete(uri)
            if not storage.is_s3(old):
                with contextlib.suppress(OSError):  # S3 has no folders; a local one goes when empty
                    storage.local_path(old).rmdir()


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint (a sharded folder or a file) with `weights_only=True`; `CheckpointError` when it
    is unreadable, incomplete or foreign."""
    if _FOLDER.search(str(uri)):
        try:
            state = sharded.load(str(uri).rstrip("/"), map_location)
        except storage.StorageError as error:
            raise CheckpointError(f"checkpoint {uri}: {error}") from None
        except sharded.ShardedCheckpointError as error:
            raise CheckpointError(str(error)) from None
        return _check_contents(state, uri)
    try:
        if storage.is_s3(uri):
            source: Any = io.BytesIO(storage.get_bytes(uri))
        else:
            source = storage.local_path(uri)
            if not source.is_file():
                raise storage.ObjectNotFound(f"cannot read {uri}: no such file")
        state = torch.load(source, map_location=map_location, weights_only=True)
    except storage.StorageUnavailable:  # the store is down: transient, not a bad checkpoint
        raise
    except storage.StorageError as error:
        raise CheckpointError(f"checkpoint {uri}: {error}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds on a truncated or foreign file
        raise CheckpointError(f"checkpoint {uri} is corrupt or not a torch checkpoint: {error}") from None
    return _check_contents(state, uri)


def _check_contents(state: Any, uri: str) -> dict[str, Any]:
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {uri} lacks {missing}; is it a maskdit training checkpoint?")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {uri} has format_version {state['format_version']}, newer than this maskdit's "
            f"{FORMAT_VERSION}; upgrade maskdit"
        )
    try:  # its config against its tensors, finite weights (maskdit/method/weights.py)
        weights.check_state(state, uri)
    except weights.WeightsError as error:
        raise CheckpointError(str(error)) from None
    return state


def load_latest(dir_uri: str, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint under `dir_uri` that loads, as (uri, state); corrupt ones are reported and skipped.

    None when the folder holds no checkpoint; `CheckpointError` naming every file when it holds
    checkpoints and none of them loads.
    """
    found = list_checkpoints(dir_uri)
    if not found and uncommitted(dir_uri):
        log.warning("%s holds no complete checkpoint, only uploads that did not finish (%s): starting from the "
                    "beginning", dir_uri, ", ".join(uri for _, uri in uncommitted(dir_uri)))
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
    if _NAME.search(str(uri)) or _FOLDER.search(str(uri)) or storage.exists(uri):
        return uri, load_checkpoint(uri, map_location)
    found = load_latest(uri, map_location)
    if found is None:
        raise CheckpointError(f"no valid checkpoint at {uri}: pass a ckpt-<step> checkpoint or a folder holding one")
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


def load_weights(net: torch.nn.Module, tensors: dict[str, Any], source: str) -> None:
    """`net.load_state_dict(tensors)` (strict), a `ModelMismatchError` naming `source` when they do not fit.

    The model config may match while the tensors do not (an edited file, a model version whose
    weights were replaced): torch's size-mismatch RuntimeError is then a one-line error, exit 2.
    """
    try:
        net.load_state_dict(tensors)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        problems = [line.strip() for line in first[1:] if line.strip()][:3]
        raise ModelMismatchError(f"the weights of {source} do not fit the model its config describes "
                                 f"({'; '.join(problems) or (first[0] if first else type(error).__name__)}"
                                 f"{'; ...' if len(first) > 4 else ''}); use a checkpoint or model version "
                                 "saved by maskdit for this model") from None


def load_ema_model(uri: str, device: str | torch.device = "cpu"):
    """(EDMPrecond with the EMA weights in eval mode, ModelConfig, meta) from a checkpoint file or folder."""
    uri, state = resolve(uri)
    precond, cfg = weights.ema_precond(state, uri, device)
    meta = {
        "uri": uri,
        "step": state["step"],
        "format_version": state["format_version"],
        "train_config": state.get("train_config"),
    }
    return precond, cfg, meta

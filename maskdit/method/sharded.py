"""Sharded training checkpoints (format_version 2): every rank writes a disjoint part; a marker commits them.

Layout of one checkpoint, a folder `<dir>/ckpt-<step:09d>/`:

    shard-<rank:02d>-of-<world:02d>-<id8>.pt   one per rank (`torch.load(weights_only=True)`):
        {"format": "maskdit-shard", "id", "step", "rank", "world_size",
         "tensors": {"model/<name>" | "ema/<name>" | "optimizer/state/<i>/<name>": tensor, ...},
         "skeleton": the checkpoint dict with every sharded tensor replaced by {"__shard__": key}
                     (rank 0 only; None elsewhere)}
    COMMIT.json                                 written last, by rank 0, once every shard is stored:
        {"format": "maskdit-sharded-checkpoint", "format_version": 2, "id", "step", "world_size",
         "shards": {name: bytes}, "model_config"}

The state is replicated under DDP, so the tensors of model, EMA and optimizer are split between the
ranks by size (largest first, each to the rank with the fewest bytes so far: the same split on every
rank, without talking); everything else (step, RNG, data position, lineage) is rank 0's, in its
skeleton. A folder without COMMIT.json is an upload that did not finish: it is not a checkpoint.
`id` (a fresh hex string a save) is in each shard's name and body, so a shard left by an earlier
attempt or another run is never mistaken for one of this checkpoint's.

Loading reads every shard, on any number of ranks; each problem is one line naming the files.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import torch

from maskdit.core import storage, upload
from maskdit.core.errors import UserError

FORMAT_VERSION = 2
COMMIT = "COMMIT.json"
SHARDED = ("model", "ema", "optimizer")  # replicated under DDP: split across ranks
_TAG = "__shard__"


class ShardedCheckpointError(UserError, RuntimeError):
    """A sharded checkpoint is incomplete or inconsistent; the message names the files."""


def shard_name(rank: int, world: int, ckpt_id: str) -> str:
    return f"shard-{rank:02d}-of-{world:02d}-{ckpt_id[:8]}.pt"


# ------------------------------------------------------------------------------ splitting


def _flatten(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """`node` with each tensor replaced by a placeholder naming its key in `out`."""
    if isinstance(node, torch.Tensor):
        out[prefix] = node
        return {_TAG: prefix}
    if isinstance(node, dict):
        return {k: _flatten(v, f"{prefix}/{k}", out) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_flatten(v, f"{prefix}/{i}", out) for i, v in enumerate(node))
    return node


def _fill(node: Any, tensors: dict[str, torch.Tensor], missing: list[str]) -> Any:
    if isinstance(node, dict):
        if set(node) == {_TAG}:
            key = node[_TAG]
            if key not in tensors:
                missing.append(key)
            return tensors.get(key)
        return {k: _fill(v, tensors, missing) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_fill(v, tensors, missing) for v in node)
    return node


def owners(tensors: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """Rank that writes each tensor: largest first, to the rank with the fewest bytes so far (deterministic)."""
    load = [0] * world
    owner = {}
    for key in sorted(tensors, key=lambda k: (-tensors[k].numel() * tensors[k].element_size(), k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += tensors[key].numel() * tensors[key].element_size()
    return owner


def _copy(tensor: torch.Tensor, buffers: dict[str, torch.Tensor] | None, key: str) -> torch.Tensor:
    """A host copy of `tensor` that training cannot change, into `buffers[key]` when given (kept from one
    checkpoint to the next: no fresh pages to fault in; page-locked for a CUDA tensor, copied asynchronously)."""
    if buffers is None:
        return tensor.detach().to("cpu", copy=True)
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype,
                                            pin_memory=tensor.device.type == "cuda")
    return buffer.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")


def stage(state: dict[str, Any], rank: int, world: int, ckpt_id: str,
          buffers: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """This rank's shard of `state`, copied to host memory (only its own share: 1/world of the big tensors).
    With `buffers`, into reused staging buffers: the caller must not stage again before the shard is written."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {k: (_flatten(v, k, tensors) if k in SHARDED else v) for k, v in state.items()}
    mine = {key: _copy(tensors[key], buffers, key) for key, r in owners(tensors, world).items() if r == rank}
    if rank == 0:  # the small rest (RNG, scaler) is rank 0's; copied so that a later step cannot change it
        skeleton = {k: (v if k in SHARDED else _flatten_copy(v)) for k, v in skeleton.items()}
    if any(t.device.type == "cuda" for t in tensors.values()):
        torch.cuda.synchronize()
    return {"format": "maskdit-shard", "id": ckpt_id, "step": state["step"], "rank": rank, "world_size": world,
            "tensors": mine, "skeleton": skeleton if rank == 0 else None}


def _flatten_copy(node: Any) -> Any:
    if isinstance(node, torch.Tensor):
        return node.detach().to("cpu", copy=True)
    if isinstance(node, dict):
        return {k: _flatten_copy(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_flatten_copy(v) for v in node)
    return node


# ------------------------------------------------------------------------------ writing


def write_shard(folder: str, shard: dict[str, Any]) -> str:
    """Stream `shard` into `<folder>/<shard name>` (atomic; multipart on S3, never a second copy in memory)."""
    uri = storage.join(folder, shard_name(shard["rank"], shard["world_size"], shard["id"]))
    with upload.open_write(uri) as stream:
        torch.save(shard, stream)
    return uri


def stored_shards(folder: str, world: int, ckpt_id: str) -> dict[str, int] | None:
    """{name: bytes} of this checkpoint's shards when all `world` are in the store, else None."""
    names = {shard_name(r, world, ckpt_id) for r in range(world)}
    found = {posixpath.basename(o.uri): o.size for o in storage.list_objects(folder)}
    return {n: found[n] for n in sorted(names)} if names <= found.keys() else None


def commit(folder: str, ckpt_id: str, step: int, world: int, shards: dict[str, int],
           model_config: dict[str, Any]) -> str:
    """Write the marker that makes the shards a checkpoint; returns the checkpoint's (folder) URI."""
    marker = {"format": "maskdit-sharded-checkpoint", "format_version": FORMAT_VERSION, "id": ckpt_id,
              "step": step, "world_size": world, "shards": shards, "model_config": model_config}
    storage.put_bytes(storage.join(folder, COMMIT), json.dumps(marker, indent=1).encode())
    for stray in storage.list_uris(folder):  # shards an earlier, killed attempt at this step left behind
        if posixpath.basename(stray) not in shards and posixpath.basename(stray) != COMMIT:
            storage.delete(stray)
    return folder


def is_committed(folder: str) -> bool:
    return storage.exists(storage.join(folder, COMMIT))


# ------------------------------------------------------------------------------ reading


def read_marker(folder: str) -> dict[str, Any]:
    """The commit marker of `folder`; a one-line error naming the folder and what it holds when there is none."""
    marker_uri = storage.join(folder, COMMIT)
    try:
        marker = json.loads(storage.get_bytes(marker_uri))
    except storage.ObjectNotFound:
        present = sorted(posixpath.basename(o.uri) for o in storage.list_objects(folder))
        raise ShardedCheckpointError(
            f"{folder} has no {COMMIT}: its upload did not finish (holds {present or 'nothing'}); it is not a "
            "checkpoint, use an older one") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ShardedCheckpointError(f"{marker_uri} is not a commit marker ({error}); use another checkpoint") from None
    if not isinstance(marker, dict) or marker.get("format") != "maskdit-sharded-checkpoint":
        raise ShardedCheckpointError(f"{marker_uri} is not a maskdit commit marker; use another checkpoint")
    if marker.get("format_version", 0) > FORMAT_VERSION:
        raise ShardedCheckpointError(f"{marker_uri} has format_version {marker['format_version']}, newer than this "
                                     f"maskdit's {FORMAT_VERSION}; upgrade maskdit")
    return marker


def load(folder: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict (as `Trainer.state()` made it, plus format_version) from every shard of `folder`."""
    marker = read_marker(folder)
    stored = {posixpath.basename(o.uri): o.size for o in storage.list_objects(folder)}
    for name, size in marker["shards"].items():
        if name not in stored:
            raise ShardedCheckpointError(f"{storage.join(folder, name)} is missing: {COMMIT} lists "
                                         f"{len(marker['shards'])} shards; use an older checkpoint")
        if stored[name] != size:
            raise ShardedCheckpointError(f"{storage.join(folder, name)} has {stored[name]} bytes, {COMMIT} says "
                                         f"{size}: half-written or replaced; use an older checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = None
    for name in marker["shards"]:
        uri = storage.join(folder, name)
        try:
            source: Any = storage.get_bytes(uri) if storage.is_s3(uri) else storage.local_path(uri)
            if storage.is_s3(uri):
                import io

                source = io.BytesIO(source)
            shard = torch.load(source, map_location=map_location, weights_only=True)
        except storage.StorageError as error:
            raise ShardedCheckpointError(f"{uri}: {error}") from None
        except Exception as error:  # noqa: BLE001 - torch raises many kinds on a truncated or foreign file
            raise ShardedCheckpointError(f"{uri} is corrupt or not a shard: {' '.join(str(error).split())[:200]}; "
                                         "use an older checkpoint") from None
        if not isinstance(shard, dict) or shard.get("id") != marker["id"] or shard.get("step") != marker["step"]:
            theirs = (shard.get("id"), shard.get("step")) if isinstance(shard, dict) else None
            raise ShardedCheckpointError(f"{uri} is a shard of another checkpoint (id, step {theirs}, {COMMIT} "
                                         f"says {(marker['id'], marker['step'])}); use an older checkpoint")
        tensors.update(shard["tensors"])
        if shard["rank"] == 0:
            skeleton = shard["skeleton"]
    if skeleton is None:
        raise ShardedCheckpointError(f"{folder}: no shard holds rank 0's part; use an older checkpoint")
    missing: list[str] = []
    state = {k: (_fill(v, tensors, missing) if k in SHARDED else v) for k, v in skeleton.items()}
    if missing:
        raise ShardedCheckpointError(f"{folder}: the shards lack {len(missing)} tensors ({missing[:3]}); "
                                     "use an older checkpoint")
    return {**state, "format_version": FORMAT_VERSION}

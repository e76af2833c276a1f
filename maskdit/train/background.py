"""Writing this rank's checkpoint shard in the background while training continues.

`save()` stages this rank's share of the state in host memory (the loop's only stall: a copy of
1/world of model, EMA and optimizer into buffers kept from one checkpoint to the next, so that this
rank holds 1/world of the state in host memory from its first checkpoint on) and starts a thread that streams it to the store
(maskdit/method/sharded.py). Rank 0's thread then waits until every rank's shard is stored, writes the
commit marker and prunes; only then is the checkpoint one. One upload at a time: the next `save()`
first waits for the previous one (a stall only when uploads are slower than `checkpoint.every`
steps), and `wait()` ends one (the last step, a stop on a signal). The thread is a daemon: a process
that exits (or is killed by the grace watchdog) abandons its upload, which never commits.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from maskdit.core import storage
from maskdit.method import checkpoint, sharded

log = logging.getLogger(__name__)
POLL_S = (0.02, 1.0)  # rank 0's wait for the other shards: first and longest interval


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed after training began (the store went away): retryable, not a UserError.
    A store that is wrong from the start (no such bucket, bad credentials) fails the resume check first."""


class BackgroundCheckpointer:
    """One rank's sharded checkpoint writer: `save()` stages and returns, `wait()` ends the upload in flight."""

    def __init__(self, dir_uri: str, rank: int, world: int, keep_last: int):
        self.dir_uri, self.rank, self.world, self.keep_last = dir_uri, rank, world, keep_last
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step: int | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # staging buffers, reused (page-locked for CUDA tensors)
        self.stall_s: float | None = None  # of the last save
        self.upload_s: float | None = None  # of the last finished upload (to the commit, on rank 0)

    def save(self, state: dict[str, Any], ckpt_id: str) -> str:
        """Stage this rank's shard of `state` and upload it in the background; returns the checkpoint's URI."""
        self.wait()
        start = time.perf_counter()
        box = [sharded.stage(state, self.rank, self.world, ckpt_id, self._buffers)]
        self.stall_s = time.perf_counter() - start
        folder = checkpoint.checkpoint_uri(self.dir_uri, state["step"])
        self._step, self._error = state["step"], None
        self._thread = threading.Thread(target=self._upload, args=(folder, box, state["model_config"], start),
                                        name=f"maskdit-checkpoint-{state['step']}", daemon=True)
        self._thread.start()
        log.info("staged the checkpoint of step %d in %.2f s; uploading %s in the background", state["step"],
                 self.stall_s, folder)
        return folder

    def _upload(self, folder: str, box: list, model_config: dict, start: float) -> None:
        try:
            shard = box.pop()  # the thread holds the only reference: freed once written
            ckpt_id, step = shard["id"], shard["step"]
            sharded.write_shard(folder, shard)
            del shard
            if self.rank == 0:
                delay = POLL_S[0]
                while (shards := sharded.stored_shards(folder, self.world, ckpt_id)) is None:
                    time.sleep(delay)
                    delay = min(delay * 2, POLL_S[1])
                sharded.commit(folder, ckpt_id, step, self.world, shards, model_config)
                checkpoint.prune(self.dir_uri, step, self.keep_last)
            self.upload_s = time.perf_counter() - start
            log.info("wrote %s of step %d in %.1f s", "the checkpoint" if self.rank == 0 else "the shard", step,
                     self.upload_s)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread at wait()
            self._error = error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the upload in flight is stored (and committed, on rank 0); raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, storage.StorageError):
                raise CheckpointWriteError(f"writing the checkpoint of step {self._step} failed: {error}") from None
            raise error

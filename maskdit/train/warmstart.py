"""Where a training run starts when its own checkpoint folder holds no checkpoint yet.

- `init_from` (a warm start): a checkpoint file or folder, or a registered model
  `models:/<name>@<alias>` / `models:/<name>/<version>` (a version `maskdit register` logged;
  its inference checkpoint holds the EMA weights, which become both model and EMA). Model and
  EMA weights only: a fresh optimizer, step 0, this run's `steps`.
- `checkpoint.resume_from` (a resume across runs): another run's checkpoint folder, e.g. a
  failed pipeline run's pretraining. Its newest checkpoint's full state (model, EMA, optimizer,
  step, RNG) continues here exactly as an in-place resume would; new checkpoints go to this
  run's `checkpoint.dir`.

Resolved once, by rank 0, then pinned. A `models:/` alias becomes the version it points at now
(`models:/<name>/<version>`, read from the MLflow registry of the run's tracking URI), a folder
its newest valid checkpoint. Rank 0 writes that resolution to `<checkpoint.dir>/init_from.json`
and broadcasts it; every rank loads exactly that version. A job restarted before its first
checkpoint reads the pin instead of resolving again (the alias may have moved meanwhile); after
that, it resumes from its own checkpoints, which record the source (`init_from`, `resumed_from`
in the checkpoint's state), and `TrainResult` and the MLflow run's tags report it as lineage.
A registered model is read from its files (`maskdit.method.modelformat`): safetensors, or a format-1
checkpoint with `weights_only`; nothing in the registry is unpickled, and the weights pass the checks of
`maskdit.method.weights` (recorded sha256, config against tensors, finite) as a checkpoint's do.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

from maskdit.core import distributed, storage
from maskdit.core.config import StrictModel
from maskdit.core.errors import EXIT_RETRYABLE, ServiceUnavailable, UserError
from maskdit.method import checkpoint
from maskdit.method.model import ModelConfig

MODELS = "models:/"
PIN_FILE = "init_from.json"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


class InitError(UserError, RuntimeError):
    """init_from or checkpoint.resume_from names nothing usable; the message names the URI and what to do."""


class InitSource(StrictModel):
    """A warm start's source, as resolved (lineage of the run)."""

    uri: str  # as configured: checkpoint file or folder, models:/<name>@<alias> or models:/<name>/<version>
    resolved: str  # the checkpoint file, or models:/<name>/<version>
    name: str | None = None  # registered model name (models:/ only)
    version: str | None = None  # registered model version (models:/ only)
    run_id: str | None = None  # the MLflow run that logged that version (models:/ only)
    step: int | None = None  # training steps the source had done

    def tags(self) -> dict[str, str]:
        """The MLflow tags of a run that started from this source."""
        tags = {"init_from": self.uri, "init_from.resolved": self.resolved}
        tags.update({f"init_from.{k}": str(v) for k in ("run_id", "step") if (v := getattr(self, k)) is not None})
        return tags


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> (name, alias, version)."""
    match = _MODEL_URI.match(uri)
    if not match:
        raise InitError(f"init_from {uri!r} is no registered model URI: use models:/<name>@<alias> (e.g. "
                        "models:/maskdit-xl2-imagenet256@champion) or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def _registry(uri: str, tracking_uri: str | None):
    from maskdit.core.tracking_server import connect

    if not tracking_uri:
        raise InitError(f"init_from {uri} is a registered model, but no MLflow tracking URI is set: set "
                        "MLFLOW_TRACKING_URI or tracking.uri to the server holding the registry")
    connect(tracking_uri)
    import mlflow

    return mlflow.MlflowClient()


def resolve(uri: str, tracking_uri: str | None) -> tuple[InitSource, dict[str, Any]]:
    """(the pinned source, its training state) of `init_from` = `uri` (rank 0 calls this)."""
    if not uri.startswith(MODELS):
        found, state = checkpoint.resolve(uri)
        return InitSource(uri=uri, resolved=found, step=state["step"]), state
    import requests
    from mlflow.exceptions import MlflowException

    from maskdit.core.retry import retrying
    from maskdit.core.tracking_server import (
        TrackingUnavailable,
        mlflow_failure,
        quick_requests,
    )

    name, alias, version = parse_model_uri(uri)
    client = _registry(uri, tracking_uri)

    def lookup():
        try:
            with quick_requests():
                return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name,
                                                                                                               version)
        except (MlflowException, requests.RequestException) as error:
            failure = mlflow_failure(error, InitError, f"init_from {uri}: the MLflow registry at {tracking_uri}")
            if isinstance(failure, TrackingUnavailable):
                raise failure from None
            raise InitError(f"{failure}; check the model name and alias (maskdit register sets candidate and "
                            "champion) or version") from None

    found = retrying(lookup, f"init_from {uri}")
    source = InitSource(uri=uri, resolved=f"{MODELS}{name}/{found.version}", name=name, version=str(found.version),
                        run_id=found.run_id)
    state = load(source, tracking_uri)
    return source.model_copy(update={"step": state["step"]}), state


def load(source: InitSource, tracking_uri: str | None) -> dict[str, Any]:
    """The training state of a resolved source (every rank loads the same file or version)."""
    if not source.resolved.startswith(MODELS):
        return checkpoint.load_checkpoint(source.resolved)
    from maskdit.method.modelformat import ModelFormatError, registered_state

    _registry(source.uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="maskdit-init-") as tmp:
        try:  # checked: recorded digests, config against tensors, finite (maskdit.method.weights)
            return registered_state(source.resolved, tmp)
        except ModelFormatError as error:
            raise InitError(f"init_from {source.uri} ({source.resolved}): {error}") from None


def _pinned(dir_uri: str, uri: str) -> InitSource | None:
    pin = storage.join(dir_uri, PIN_FILE)
    if not storage.exists(pin):
        return None
    source = InitSource.model_validate_json(storage.get_bytes(pin))
    return source if source.uri == uri else None  # another init_from: resolve it anew


def start_from(uri: str, dir_uri: str, tracking_uri: str | None, is_main: bool) -> tuple[InitSource, dict[str, Any]]:
    """Resolve `init_from` on rank 0 (or read its pin), broadcast it, and load it on every rank."""
    source, state, refused = None, None, None
    if is_main:
        try:
            source = _pinned(dir_uri, uri)
            if source is None:
                source, state = resolve(uri, tracking_uri)
                storage.put_bytes(storage.join(dir_uri, PIN_FILE), source.model_dump_json(indent=1).encode())
        except UserError as error:  # every rank stops with rank 0's reason (and its exit code)
            refused = (str(error), error.exit_code)
    shared, refused = distributed.broadcast_object((source.model_dump() if source else None, refused))
    if refused:
        raise (ServiceUnavailable if refused[1] == EXIT_RETRYABLE else InitError)(refused[0])
    source = InitSource(**shared)
    return source, state if state is not None else load(source, tracking_uri)


def check_model(expected: ModelConfig, state: dict[str, Any], source: InitSource) -> None:
    """Refuse a warm start whose network differs from the config's, naming both and what to do."""
    theirs, ours = state["model_config"], expected.model_dump()
    if theirs == ours:
        return
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    where = source.uri if source.resolved == source.uri else f"{source.uri} (= {source.resolved})"
    raise checkpoint.ModelMismatchError(
        f"init_from {where} is another network than the config's model (fields {diff}):\n"
        f"  config model:    {ours}\n  init_from model: {theirs}\n"
        "set the config's model to init_from's (e.g. model.<field>=<value> for each field above), or choose an "
        "init_from trained with this model"
    )


def resume_state(folder: str) -> tuple[str, dict[str, Any]]:
    """(uri, state) of the newest valid checkpoint in `checkpoint.resume_from`; InitError when it holds none."""
    found = checkpoint.load_latest(folder)
    if found is None:
        raise InitError(f"checkpoint.resume_from {folder} holds no checkpoint (ckpt-<step>): name the folder of "
                        "the run to resume (e.g. <store>/runs/<run id>/pretrain), or leave resume_from empty")
    return found

"""The MLflow run a step logs to; it does nothing when no tracking URI is configured.

Where a run goes (the environment wins, so a pipeline can nest all its steps under one run):
- tracking URI: env MLFLOW_TRACKING_URI, else the `uri` argument, else no tracking at all
  (`maskdit.core.tracking_server`, which also keeps credentials out of logs);
- run: `run_id` argument (a resumed training), else env MLFLOW_RUN_ID (resume), else a new run;
- parent: env MASKDIT_PARENT_RUN_ID (recorded as the `mlflow.parentRunId` tag, so the parent
  need not be active; `maskdit.core.parent_run`), else the run active in this process when
  `nested` is true;
- experiment: the parent's, else env MLFLOW_EXPERIMENT_NAME, else the `experiment` argument.

Only global rank 0 talks to MLflow: other ranks pass `enabled=False`.

An MLflow outage never stops the work once it runs; at the start (reachability, run creation,
params) a server that is down or overloaded is retried within the budget of maskdit/core/retry.py,
then one line and exit 143 (`TrackingUnavailable`); afterwards `log_metrics` inside `tracking_run` only queues, and a `MetricLogger` thread
(`maskdit.core.metric_logger`) sends the queue. Params and tags are redacted (`storage.redact`)
before they are logged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from maskdit.core.config import flatten
from maskdit.core.metric_logger import MetricLogger
from maskdit.core.parent_run import PARENT_TAG, env_parent
from maskdit.core.retry import retrying
from maskdit.core.storage import redact
from maskdit.core.tracking_server import (
    TrackingError,
    check_reachable,
    connect,
    error_reason,
    is_transient,
    mlflow_failure,
    quick_requests,
    tracking_uri,
)

log = logging.getLogger(__name__)
_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


@contextmanager
def tracking_run(
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = True,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
    enabled: bool = True,
    retry_s: float = 10.0,
    flush_s: float = 20.0,
    system_metrics: bool = False,
) -> Iterator[str | None]:
    """Start (or resume) an MLflow run, log `params` flattened, yield its id; yield None when not tracking.

    A `run_id` (from a checkpoint) that the server does not know starts a new run instead. An
    unreachable server here is a `TrackingError`; later, metrics wait in a `MetricLogger` (retried
    every `retry_s` s, at most `flush_s` s of waiting at the end) and nothing raises. `system_metrics`
    turns on MLflow's system metrics (system/cpu_..., system/gpu_... every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10; needs psutil, and nvidia-ml-py for GPUs).
    """
    uri = tracking_uri(uri) if enabled else None
    if uri is None:
        yield None
        return

    uri = connect(uri)
    check_reachable(uri)
    if system_metrics and importlib.util.find_spec("psutil") is None:  # MLflow would refuse to start the run
        log.warning("psutil is not installed: this run gets no MLflow system metrics (pip install psutil)")
        system_metrics = False
    run = retrying(lambda: _start_run(run_name, tags, nested, experiment, run_id, system_metrics, uri),
                   f"MLflow at {redact(uri)}")
    global _metric_logger
    status, logger, outer = "FAILED", None, _metric_logger
    try:
        if params:
            flat = redact(flatten(params))
            retrying(lambda: _classified(_log_params, run.info.run_id, flat), f"MLflow at {redact(uri)}")
        logger = _metric_logger = MetricLogger(run.info.run_id, uri, retry_s=retry_s)
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _metric_logger = outer  # a nested run hands the queue back to its parent
        down = logger is not None and not logger.close(flush_s)
        _end_run(status, uri, quick=down)


def _start_run(run_name: str | None, tags: dict[str, str] | None, nested: bool, experiment: str | None,
               run_id: str | None, system_metrics: bool, uri: str):
    """Start (or resume) the run; an MLflow failure is classified (`mlflow_failure`): busy or down is retried."""
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    try:
        with quick_requests():  # one try per attempt: the retry budget, not MLflow's own retries, decides
            if run_id and not _run_exists(run_id):
                log.warning("MLflow run %s is not on %s; starting a new run", run_id, uri)
                run_id = None
            run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
            tags = redact(dict(tags or {}))
            if run_id:  # resume it in its own experiment, whatever this process used before
                mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
                return mlflow.start_run(run_id=run_id, nested=nested and mlflow.active_run() is not None,
                                        log_system_metrics=system_metrics)
            parent = env_parent()
            if parent:
                experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
                tags[PARENT_TAG] = parent
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
                experiment_id = mlflow.set_experiment(name).experiment_id if name else None
            return mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags or None,
                                    nested=nested and mlflow.active_run() is not None,
                                    log_system_metrics=system_metrics)
    except (MlflowException, requests.RequestException) as error:
        raise mlflow_failure(error, TrackingError, f"starting an MLflow run on {redact(uri)}") from None


def _end_run(status: str, uri: str, quick: bool) -> None:
    """End the active run; a server that cannot take it is a warning, never an error (the work is done)."""
    import mlflow

    try:
        with quick_requests() if quick else nullcontext():
            mlflow.end_run(status=status)
    except Exception as error:  # noqa: BLE001 - see error_reason
        log.warning("could not mark the MLflow run as %s on %s (%s); it stays RUNNING there",
                    status, uri, error_reason(error))


_metric_logger: MetricLogger | None = None


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id) is not None
    except MlflowException as error:
        if is_transient(error):  # down or busy is not "no such run": a new run would orphan the old one
            raise
        return False


def _classified(call, *args):
    """`call(*args)` with MLflow's failures classified (`mlflow_failure`), one try per attempt."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        with quick_requests():
            return call(*args)
    except (MlflowException, requests.RequestException) as error:
        raise mlflow_failure(error, TrackingError, "logging the run's params") from None


def _log_params(run_id: str, flat: dict[str, Any]) -> None:
    """Log params in batches; on a resumed run keep the values already there (MLflow cannot change them)."""
    import mlflow

    logged = mlflow.MlflowClient().get_run(run_id).data.params
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v))
    if changed:
        log.warning("run %s keeps its earlier values of params %s (MLflow params cannot change)", run_id, changed)
    new = {k: v for k, v in flat.items() if k not in logged}
    items = list(new.items())
    for start in range(0, len(items), _PARAMS_PER_CALL):
        mlflow.log_params(dict(items[start : start + _PARAMS_PER_CALL]))


def active_run_id() -> str | None:
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else None


def run_location() -> tuple[str | None, str | None]:
    """(tracking URI without credentials, experiment id) of the active run; (None, None) without one."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    if run is None:
        return None, None
    return redact(mlflow.get_tracking_uri()), run.info.experiment_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run (queued inside `tracking_run`); a no-op without one (not tracking, not rank 0)."""
    run_id = active_run_id()
    if run_id is None:
        return
    logger = _metric_logger
    if logger is not None and logger.run_id == run_id:
        logger.log(metrics, step)
    else:
        sys.modules["mlflow"].log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    if active_run_id() is not None:
        sys.modules["mlflow"].log_artifact(str(path), artifact_path=artifact_path)


def log_image(path: str | os.PathLike, artifact_path: str = "images") -> None:
    """An image file (PNG, ...) as an artifact under `images/`."""
    log_artifact(path, artifact_path)


def _best_effort(what: str, call, *args, **kwargs) -> None:
    """An MLflow call that must not stop training: a failure is one warning (the server may be down)."""
    if active_run_id() is None:
        return
    try:
        call(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - see error_reason
        log.warning("could not log %s to MLflow (%s); training goes on", what, error_reason(error))


def log_image_at_step(image, key: str, step: int) -> None:
    """A uint8 (H, W, 3) image under `key` at `step`: MLflow's UI shows the images of a key on a step slider."""
    if active_run_id() is not None:
        _best_effort(f"image {key} of step {step}", sys.modules["mlflow"].log_image, image, key=key, step=step,
                     synchronous=True)


def log_text(text: str, artifact_file: str) -> None:
    """`text` as the artifact `artifact_file` (e.g. config.yaml) of the active run."""
    if active_run_id() is not None:
        _best_effort(artifact_file, sys.modules["mlflow"].log_text, text, artifact_file)


def log_dataset(uri: str, digest: str, count: int, shape: tuple[int, ...], name: str | None = None,
                context: str = "training", **profile: Any) -> None:
    """The dataset at `uri` as an input of the active run: source = the URI, `digest`, and a profile with
    `count` samples (plus `profile`); its schema is x0 float32 (-1, *shape) and label int64 (-1,)."""
    if active_run_id() is None:
        return
    import warnings

    import mlflow
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    class ShardSet(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return {"num_samples": count, **profile}

        def to_dict(self) -> dict[str, str]:
            import json

            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (all local)
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(redact(uri))
    schema = Schema([TensorSpec(np.dtype("float32"), (-1, *shape), "x0"), TensorSpec(np.dtype("int64"), (-1,), "label")])
    dataset = ShardSet(source, name=name or uri.rstrip("/").rsplit("/", 1)[-1], digest=digest, schema=schema)
    _best_effort(f"dataset {uri}", mlflow.log_input, dataset, context=context)


def set_tags(tags: dict[str, Any]) -> None:
    if active_run_id() is not None:
        sys.modules["mlflow"].set_tags({k: str(v) for k, v in tags.items()})


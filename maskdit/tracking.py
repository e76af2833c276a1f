"""MLflow tracking that every step shares; it does nothing when no tracking URI is configured.

Where a run goes (the environment wins, so a pipeline can nest all its steps under one run):
- tracking URI: env MLFLOW_TRACKING_URI, else the `uri` argument, else no tracking at all;
- run: `run_id` argument (a resumed training), else env MLFLOW_RUN_ID (resume), else a new run;
- parent: env MASKDIT_PARENT_RUN_ID (recorded as the `mlflow.parentRunId` tag, so the parent
  need not be active), else the run active in this process when `nested` is true;
- experiment: the parent's, else env MLFLOW_EXPERIMENT_NAME, else the `experiment` argument.

Only global rank 0 talks to MLflow: other ranks pass `enabled=False`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from maskdit.config import flatten

log = logging.getLogger(__name__)
_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def tracking_uri(configured: str | None = None) -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or None


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
) -> Iterator[str | None]:
    """Start (or resume) an MLflow run, log `params` flattened, yield its id; yield None when not tracking.

    A `run_id` (from a checkpoint) that the server does not know starts a new run instead.
    """
    uri = tracking_uri(uri) if enabled else None
    if uri is None:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    if run_id and not _run_exists(run_id):
        log.warning("MLflow run %s is not on %s; starting a new run", run_id, uri)
        run_id = None
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    tags = dict(tags or {})
    if run_id:
        run = mlflow.start_run(run_id=run_id, nested=nested and mlflow.active_run() is not None)
    else:
        parent = os.environ.get("MASKDIT_PARENT_RUN_ID")
        if parent:
            experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
            tags["mlflow.parentRunId"] = parent
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
            experiment_id = mlflow.set_experiment(name).experiment_id if name else None
        run = mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags or None,
                               nested=nested and mlflow.active_run() is not None)
    status = "FAILED"
    try:
        if params:
            _log_params(run.info.run_id, flatten(params))
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id) is not None
    except MlflowException:
        return False


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


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run; a no-op without one (not tracking, or not rank 0)."""
    if active_run_id() is not None:
        sys.modules["mlflow"].log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    if active_run_id() is not None:
        sys.modules["mlflow"].log_artifact(str(path), artifact_path=artifact_path)


def log_image(path: str | os.PathLike, artifact_path: str = "images") -> None:
    """An image file (PNG, ...) as an artifact under `images/`."""
    log_artifact(path, artifact_path)


def set_tags(tags: dict[str, Any]) -> None:
    if active_run_id() is not None:
        sys.modules["mlflow"].set_tags({k: str(v) for k, v in tags.items()})


def close_stale_runs(parent_run_id: str, reason: str, status: str = "KILLED", *, step: str | None = None,
                     uri: str | None = None) -> list[str]:
    """Mark every child run of `parent_run_id` still RUNNING as `status` (KILLED or FAILED); say why.

    A child is still RUNNING after its process ended when nothing could close it (SIGKILL, the OOM
    killer, a lost node). Each closed child gets the tag `maskdit.closed_reason` = `reason`; the parent
    gets `maskdit.closed_run.<child id>` = "<status>: <reason>". `step` limits this to children tagged
    `maskdit.step=<step>` (a retried step closing its own earlier attempt). Call it when no step of the
    pipeline run is running: a live child would be closed too. A training resumed later reopens its run.
    Returns the closed run ids; [] when not tracking.
    """
    if status not in ("KILLED", "FAILED"):
        raise ValueError(f"status {status!r}: use 'KILLED' or 'FAILED'")
    uri = tracking_uri(uri)
    if uri is None:
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if step is not None:
        query += f" and tags.`maskdit.step` = '{step}'"
    stale, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        stale.extend(run.info.run_id for run in page)
        token = page.token
        if not token:
            break
    note = reason[:5000]  # MLflow limits tag values
    for run_id in stale:
        client.set_tag(run_id, "maskdit.closed_reason", note)
        client.set_terminated(run_id, status=status)
        client.set_tag(parent_run_id, f"maskdit.closed_run.{run_id}", f"{status}: {note}")
        log.warning("closed MLflow run %s (child of %s, still RUNNING) as %s: %s", run_id, parent_run_id, status,
                    reason)
    return stale

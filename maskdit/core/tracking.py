"""MLflow tracking that every step shares; it does nothing when no tracking URI is configured.

Where a run goes (the environment wins, so a pipeline can nest all its steps under one run):
- tracking URI: env MLFLOW_TRACKING_URI, else the `uri` argument, else no tracking at all;
- run: `run_id` argument (a resumed training), else env MLFLOW_RUN_ID (resume), else a new run;
- parent: env MASKDIT_PARENT_RUN_ID (recorded as the `mlflow.parentRunId` tag, so the parent
  need not be active), else the run active in this process when `nested` is true;
- experiment: the parent's, else env MLFLOW_EXPERIMENT_NAME, else the `experiment` argument.

Only global rank 0 talks to MLflow: other ranks pass `enabled=False`.

An MLflow outage never stops the work (only an unreachable server at the start does, with one
line): `log_metrics` inside `tracking_run` only queues; a `MetricLogger` thread sends the queue,
retries every `retry_s` seconds while the server is down (one warning), replays the backlog in
order when it is back, and at the end waits at most `flush_s` seconds and says what was lost.
Credentials in a tracking URI (`http://user:password@host`) are moved into MLflow's
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, so neither MLflow nor maskdit prints, logs
or stores them; params and tags are redacted (`storage.redact`) before they are logged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from maskdit.core.config import flatten
from maskdit.core.errors import UserError
from maskdit.core.storage import redact

log = logging.getLogger(__name__)
_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
_REQUEST_TIMEOUT_S = 10  # one HTTP request to MLflow from the metric thread or the reachability check


class TrackingError(UserError, RuntimeError):
    """The MLflow server cannot be reached or refuses us; the message names it and what to check."""


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
    import mlflow

    uri = connect(uri)
    check_reachable(uri)
    if system_metrics and importlib.util.find_spec("psutil") is None:  # MLflow would refuse to start the run
        log.warning("psutil is not installed: this run gets no MLflow system metrics (pip install psutil)")
        system_metrics = False
    if run_id and not _run_exists(run_id):
        log.warning("MLflow run %s is not on %s; starting a new run", run_id, uri)
        run_id = None
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    tags = redact(dict(tags or {}))
    if run_id:  # resume it in its own experiment, whatever this process used before
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
        run = mlflow.start_run(run_id=run_id, nested=nested and mlflow.active_run() is not None,
                               log_system_metrics=system_metrics)
    else:
        parent = os.environ.get("MASKDIT_PARENT_RUN_ID")
        if parent:
            experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
            tags["mlflow.parentRunId"] = parent
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
            experiment_id = mlflow.set_experiment(name).experiment_id if name else None
        run = mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags or None,
                               nested=nested and mlflow.active_run() is not None, log_system_metrics=system_metrics)
    global _metric_logger
    status, logger, outer = "FAILED", None, _metric_logger
    try:
        if params:
            _log_params(run.info.run_id, redact(flatten(params)))
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


def connect(uri: str) -> str:
    """Point MLflow at `uri`, with a `user:password@` in it moved to MLFLOW_TRACKING_USERNAME/PASSWORD.

    Returns the URI without credentials: the one MLflow then prints ("View run at ...") and logs.
    """
    import mlflow

    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        if parts.password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    mlflow.set_tracking_uri(uri)
    return uri


def _reason(error: BaseException) -> str:
    """The root cause of a requests / MLflow error in a few words ("[Errno 111] Connection refused")."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"(Read|Connect)TimeoutError|timed out", text)
    return redact(found.group(0).strip() if found else f"{type(error).__name__}: {text[:200]}")


def check_reachable(uri: str, retries: int = 2) -> None:
    """`TrackingError` (one line) unless the MLflow server at `uri` answers an API call; quick (a few s)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return  # a local store (sqlite, file): nothing to reach
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=retries, backoff_factor=1, timeout=_REQUEST_TIMEOUT_S,
                                raise_on_status=False, params={"max_results": 1})
    except Exception as error:  # noqa: BLE001 - requests and MLflow wrap connection errors in many types
        raise TrackingError(f"MLflow at {redact(uri)} is unreachable ({_reason(error)}); start the server or fix "
                            "MLFLOW_TRACKING_URI / tracking.uri (unset both to run without tracking)") from None
    if response.status_code in (401, 403):
        raise TrackingError(f"MLflow at {redact(uri)} refused us (HTTP {response.status_code}); set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the maskdit-mlflow Secret)")
    if response.status_code >= 400:
        raise TrackingError(f"{redact(uri)} answered HTTP {response.status_code} to an MLflow API call; is "
                            "MLFLOW_TRACKING_URI / tracking.uri the MLflow server's address?")


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set in this process for the block (MLflow reads its settings there); restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quick_requests():
    """MLflow calls in this block try once, for at most a few seconds (the server is known to be down)."""
    return environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(_REQUEST_TIMEOUT_S)})


def _end_run(status: str, uri: str, quick: bool) -> None:
    """End the active run; a server that cannot take it is a warning, never an error (the work is done)."""
    import mlflow

    try:
        with _quick_requests() if quick else nullcontext():
            mlflow.end_run(status=status)
    except Exception as error:  # noqa: BLE001 - see _reason
        log.warning("could not mark the MLflow run as %s on %s (%s); it stays RUNNING there",
                    status, uri, _reason(error))


class MetricLogger:
    """Sends one run's metrics from a thread of its own, so the caller never waits for MLflow.

    `log` only queues (up to `max_buffered` values; beyond that the oldest are dropped and counted).
    The thread sends the queue in batches, one HTTP try each; while the server does not answer it
    keeps the queue, warns once and tries again every `retry_s` seconds, and replays the backlog in
    order once it answers. `close` waits at most `flush_s` seconds for the backlog and says what
    could not be sent.
    """

    def __init__(self, run_id: str, uri: str, retry_s: float = 10.0, max_buffered: int = 100_000):
        import mlflow

        self.run_id, self.uri, self.retry_s = run_id, uri, retry_s
        self._client = mlflow.MlflowClient(uri)
        self._rest = urlsplit(uri).scheme in ("http", "https")
        self._pending: deque = deque(maxlen=max_buffered)
        self._lock = threading.Lock()
        self._wake, self._closing, self._give_up = threading.Event(), threading.Event(), threading.Event()
        self.sent = self.dropped = 0
        self.down_since: float | None = None
        self.outage_s = 0.0
        self._thread = threading.Thread(target=self._work, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with self._lock:
            self.dropped += max(0, len(self._pending) + len(values) - self._pending.maxlen)
            self._pending.extend(values)
        self._wake.set()

    def _send(self, batch: list) -> None:
        if not self._rest:
            self._client.log_batch(self.run_id, metrics=batch)
            return
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"
        body = {"run_id": self.run_id, "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                                    "step": m.step} for m in batch]}
        response = http_request(get_default_host_creds(self.uri), endpoint, "POST", max_retries=0,
                                timeout=_REQUEST_TIMEOUT_S, json=body)
        verify_rest_response(response, endpoint)

    def _work(self) -> None:
        while True:
            with self._lock:
                batch = [self._pending[i] for i in range(min(len(self._pending), _METRICS_PER_CALL))]
            if not batch:
                if self._closing.is_set():
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._send(batch)
            except Exception as error:  # noqa: BLE001 - any failure to send: keep the batch, retry later
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("MLflow at %s is unreachable (%s); training goes on, metrics are buffered and "
                                "retried every %g s", self.uri, _reason(error), self.retry_s)
                if self._give_up.wait(self.retry_s):
                    return
                continue
            with self._lock:
                for _ in batch:
                    self._pending.popleft()
                self.sent += len(batch)
            if self.down_since is not None:
                self.outage_s += time.monotonic() - self.down_since
                self.down_since = None
                log.warning("MLflow at %s is back after %.0f s; replaying the buffered metrics", self.uri,
                            self.outage_s)

    def close(self, flush_s: float = 20.0) -> bool:
        """Send what is queued, waiting at most `flush_s` s; False (and a warning) if some could not be sent."""
        self._closing.set()
        self._wake.set()
        self._thread.join(flush_s)
        self._give_up.set()
        self._thread.join(_REQUEST_TIMEOUT_S + 1)  # a request in flight ends within its timeout
        with self._lock:
            lost = list(self._pending)
        if lost or self.dropped:
            steps = sorted({m.step for m in lost})
            log.warning("MLflow at %s was unreachable at the end: %d metric values of run %s were not logged "
                        "(steps %s..%s, %d more dropped from a full buffer); the work itself is complete",
                        self.uri, len(lost) + self.dropped, self.run_id, steps[0] if steps else "-",
                        steps[-1] if steps else "-", self.dropped)
            return False
        if self.outage_s:
            log.warning("MLflow at %s was unreachable for %.0f s during the run; all %d metric values were logged",
                        self.uri, self.outage_s, self.sent)
        return True


_metric_logger: MetricLogger | None = None


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
    except Exception as error:  # noqa: BLE001 - see _reason
        log.warning("could not log %s to MLflow (%s); training goes on", what, _reason(error))


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

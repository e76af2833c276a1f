"""Metrics sent to MLflow from a thread of their own, so that an MLflow outage never stops the work.

`log` only queues; the thread sends the queue, retries every `retry_s` seconds while the server is
down (one warning), replays the backlog in order when it is back, and at the end (`close`) waits at
most `flush_s` seconds and says what was lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from urllib.parse import urlsplit

from maskdit.core.tracking_server import REQUEST_TIMEOUT_S, error_reason

log = logging.getLogger(__name__)
_METRICS_PER_CALL = 1000  # MLflow's log_batch limit


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
                                timeout=REQUEST_TIMEOUT_S, json=body)
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
                                "retried every %g s", self.uri, error_reason(error), self.retry_s)
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
        self._thread.join(REQUEST_TIMEOUT_S + 1)  # a request in flight ends within its timeout
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

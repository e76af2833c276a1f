"""MLflow as deployed, under a team's load (issue 29.2): N training-shaped clients against one server.

    PYTHONPATH=. .venv/bin/python benchmarks/mlflow_load.py --backend postgres --clients 64 \\
        --seconds 120 --restart-at 60 --out /tmp/mlflow-load-postgres.json

The server is the real `mlflow server` with the arguments of k8s/base/mlflow.yaml (basic-auth
app, its workers) on 127.0.0.1 (tests/fixtures/mlflow_deployed.py): --backend sqlite is the
base's store; --backend postgres is k8s/components/mlflow-postgres's (store, auth store and pool
sizes) on a real PostgreSQL server started here (tests/fixtures/postgres.py). Each client is
shaped like a training run: it creates a run (as training does, through MlflowClient and its
retries), then sends metric batches of 15 values back to back the way the training's metric
thread sends them (maskdit/core/metric_logger.py: one try per request, a failed batch kept and
sent again after the thread's retry interval), a batch of system metrics every
--system-every batches, and at the end ends the run and registers one model version. With
--restart-at T the server is stopped (SIGTERM) and started again T seconds in.

Out (JSON, also printed): batches/s, p50/p99 latency of the metric requests, the server's
answers that were not a success by kind (errors_by_kind: the metric thread absorbs these),
errors_reaching_training (a failed create_run, end of run or registration, which a training
step would see), and points lost: what each client sent against what the server returns for its
run afterwards. /proc/loadavg before and after, since the machine may be shared. Every loop is
bounded in time and count; only loopback addresses.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from host import loadavg  # noqa: E402

METRICS_PER_BATCH = 15
SYSTEM_KEYS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
               "system/system_memory_usage_percentage", "system/disk_usage_percentage",
               "system/network_receive_megabytes", "system/network_transmit_megabytes",
               "system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes")
MAX_BATCHES_PER_CLIENT = 1_000_000  # a bound besides the clock
FLUSH_S = 20.0  # what MetricLogger.close waits at the end for a backlog
READY_TIMEOUT_S = 900.0  # every client has imported MLflow and created its run (slow on a busy machine)


def error_kind(error: BaseException) -> str:
    """A short, stable label: the MLflow error code and the first words of the message, or the exception type."""
    code = getattr(error, "error_code", None)
    text = " ".join(str(error).split())
    if "QueuePool limit" in text:
        text = "QueuePool limit reached"
    elif "Connection refused" in text:
        text = "connection refused"
    elif "timed out" in text or "Timeout" in text:
        text = "timeout"
    return f"{code}: {text[:80]}" if code else f"{type(error).__name__}: {text[:80]}"


def retry_interval() -> float:
    """The training metric thread's retry interval (MetricLogger's default)."""
    from maskdit.core.metric_logger import MetricLogger

    return float(inspect.signature(MetricLogger).parameters["retry_s"].default)


class Client:
    """One training-shaped client; `run()` fills its counters."""

    def __init__(self, index: int, uri: str, experiment_id: str, start, system_every: int, retry_s: float):
        self.index, self.uri, self.experiment_id = index, uri, experiment_id
        self.start, self.deadline = start, 0.0  # (ready queue, go event, shared deadline)
        self.system_every, self.retry_s = system_every, retry_s
        self.latencies_ms: list[float] = []
        self.server_errors: Counter = Counter()
        self.training_errors: Counter = Counter()
        self.sent: dict[str, set[int]] = {}
        self.batches = self.system_batches = self.failed_requests = self.registered = 0
        self.create_run_ms = 0.0
        self.returned = self.duplicated = 0

    def _post_batch(self, run_id: str, metrics: list) -> None:
        """One request, as maskdit/core/metric_logger.py sends it (no retry inside the request)."""
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        from maskdit.core.tracking_server import REQUEST_TIMEOUT_S

        endpoint = "/api/2.0/mlflow/runs/log-batch"
        body = {"run_id": run_id, "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                               "step": m.step} for m in metrics]}
        response = http_request(get_default_host_creds(self.uri), endpoint, "POST", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S, json=body)
        verify_rest_response(response, endpoint)

    def _send(self, run_id: str, metrics: list, until: float) -> bool:
        """Send until acknowledged or `until`: a failure waits the metric thread's retry interval."""
        while True:
            began = time.perf_counter()
            try:
                self._post_batch(run_id, metrics)
                self.latencies_ms.append((time.perf_counter() - began) * 1000)
                return True
            except Exception as error:  # noqa: BLE001 - every failed answer is counted by kind
                self.failed_requests += 1
                self.server_errors[error_kind(error)] += 1
            if time.time() + self.retry_s > until:
                return False
            time.sleep(self.retry_s)

    def _training_call(self, what: str, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a failure here is one a training step would see
            self.training_errors[f"{what}: {error_kind(error)}"] += 1
            return None

    def run(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(self.uri)
        began = time.perf_counter()
        run = self._training_call("create_run", client.create_run, self.experiment_id,
                                  run_name=f"load-{self.index}")
        self.create_run_ms = (time.perf_counter() - began) * 1000
        ready, go, deadline = self.start
        ready.put(run is not None)
        if run is None or not go.wait(READY_TIMEOUT_S):
            return
        self.deadline = deadline.value
        run_id = run.info.run_id
        pending: list[list] = []  # batches not yet acknowledged (the metric thread's backlog)
        for step in range(MAX_BATCHES_PER_CLIENT):
            if time.time() >= self.deadline or len(pending) > 2:  # unsent backlog: no new batch (no spin)
                break
            now = int(time.time() * 1000)
            batch = [Metric(f"train/m{i:02d}", float(step * METRICS_PER_BATCH + i), now, step)
                     for i in range(METRICS_PER_BATCH)]
            system = (step % self.system_every == 0)
            for metric in batch + ([Metric(k, float(step), now, step) for k in SYSTEM_KEYS] if system else []):
                self.sent.setdefault(metric.key, set()).add(step)
            for metrics in ([batch] + ([[Metric(k, float(step), now, step) for k in SYSTEM_KEYS]] if system else [])):
                pending.append(metrics)
            while pending and time.time() < self.deadline:
                if not self._send(run_id, pending[0], self.deadline):
                    break  # within a retry interval of the end: the flush below has the rest
                acknowledged = pending.pop(0)
                if acknowledged[0].key.startswith("system/"):
                    self.system_batches += 1
                else:
                    self.batches += 1
        flush_until = time.time() + FLUSH_S
        while pending and self._send(run_id, pending[0], flush_until):
            done = pending.pop(0)
            self.system_batches += done[0].key.startswith("system/")
            self.batches += not done[0].key.startswith("system/")
        self._training_call("set_terminated", client.set_terminated, run_id)
        name = f"load-model-{self.index}"
        if self._training_call("create_registered_model", client.create_registered_model, name) is not None:
            if self._training_call("create_model_version", client.create_model_version, name,
                                   f"runs:/{run_id}/model", run_id=run_id) is not None:
                self.registered = 1
        for key, steps in self.sent.items():  # what the server returns, against what was sent
            history = self._training_call("get_metric_history", client.get_metric_history, run_id, key) or []
            returned = [m.step for m in history]
            self.returned += len(set(returned) & steps)
            self.duplicated += len(returned) - len(set(returned))

    def summary(self) -> dict:
        return {"latencies_ms": self.latencies_ms, "server_errors": dict(self.server_errors),
                "training_errors": dict(self.training_errors), "batches": self.batches,
                "system_batches": self.system_batches, "failed_requests": self.failed_requests,
                "points_sent": sum(len(s) for s in self.sent.values()),
                "system_points_sent": sum(len(s) for k, s in self.sent.items() if k.startswith("system/")),
                "points_returned": self.returned, "points_duplicated": self.duplicated,
                "registered": self.registered, "create_run_ms": self.create_run_ms}


def client_process(indices: list[int], uri: str, env: dict, experiment_id: str, start: tuple,
                   system_every: int, retry_s: float, out: mp.Queue) -> None:
    """A process of clients, one thread each; puts one summary per client on `out`."""
    os.environ.update(env)
    sys.stdout = sys.stderr  # MLflow prints a "View run" line per run: stdout is the JSON's
    clients = [Client(i, uri, experiment_id, start, system_every, retry_s) for i in indices]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    start[1].wait(READY_TIMEOUT_S)
    hard_stop = start[2].value + FLUSH_S + 300  # run end, registration and read-back: bounded too
    for thread in threads:
        thread.join(max(1.0, hard_stop - time.time()))
    for client, thread in zip(clients, threads):
        summary = client.summary()
        if thread.is_alive():
            summary["training_errors"]["client did not finish in time"] = 1
        out.put(summary)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 1)


def say(message: str) -> None:
    print(f"[mlflow_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    from fixtures.mlflow_deployed import DeployedMlflow, postgres_component_env

    root = Path(tempfile.mkdtemp(prefix="mlflow-load-"))
    postgres = None
    if args.backend == "postgres":
        from fixtures.postgres import PostgresServer

        postgres = PostgresServer()
        postgres.start()
    server = DeployedMlflow(root / "server", backend=args.backend, postgres=postgres)
    try:
        startup_s = server.start()
        say(f"{args.backend} server up in {startup_s:.1f} s at {server.uri}; {args.clients} clients for {args.seconds:g} s")
        env = server.client_env()
        os.environ.update(env)
        from mlflow import MlflowClient

        experiment_id = MlflowClient(server.uri).create_experiment(f"load-{args.backend}")
        retry_s = args.retry_s if args.retry_s is not None else retry_interval()
        procs = max(1, min(args.procs, args.clients))
        groups = [list(range(args.clients))[i::procs] for i in range(procs)]
        ctx = mp.get_context("spawn")
        out, ready, go, shared_deadline = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
        workers = [ctx.Process(target=client_process, args=(g, server.uri, env, experiment_id,
                                                              (ready, go, shared_deadline), args.system_every,
                                                              retry_s, out), daemon=True)
                   for g in groups]
        for worker in workers:
            worker.start()
        # the timed window starts once every client has created its run
        runs_created = sum(bool(ready.get(timeout=READY_TIMEOUT_S)) for _ in range(args.clients))
        load_before = loadavg()
        started = time.time()
        deadline = started + args.seconds
        shared_deadline.value = deadline
        go.set()
        say(f"{runs_created}/{args.clients} runs created; sending for {args.seconds:g} s")
        downtime = None
        if args.restart_at is not None:
            time.sleep(max(0.0, started + args.restart_at - time.time()))
            say("restarting the server")
            downtime = server.restart()
            say(f"server back after {downtime:.1f} s")
        summaries = []
        for _ in range(args.clients):
            summaries.append(out.get(timeout=max(1.0, deadline + FLUSH_S + 360 - time.time())))
            say(f"client {len(summaries)}/{args.clients} done")
        for worker in workers:
            worker.join(30)
        load_after = loadavg()
    finally:
        server.stop()
        if postgres is not None:
            postgres.remove()
        shutil.rmtree(root, ignore_errors=True)

    latencies = [x for s in summaries for x in s["latencies_ms"]]
    server_errors, training_errors = Counter(), Counter()
    for s in summaries:
        server_errors.update(s["server_errors"])
        training_errors.update(s["training_errors"])
    batches = sum(s["batches"] for s in summaries)
    sent = sum(s["points_sent"] for s in summaries)
    returned = sum(s["points_returned"] for s in summaries)
    return {
        "backend": args.backend, "clients": args.clients, "client_processes": procs, "seconds": args.seconds,
        "restart_at": args.restart_at, "restarts": server.restarts,
        "restart_downtime_s": round(downtime, 2) if downtime is not None else None,
        "server": {"command": [a for a in server.command() if "sqlite" not in a and "tmp" not in a],
                   "workers": server.workers(), "startup_s": round(startup_s, 2),
                   "pool": postgres_component_env() if args.backend == "postgres" else "SQLAlchemy's default"},
        "metric_retry_s": retry_s, "system_every": args.system_every,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
        "batches": batches, "system_batches": sum(s["system_batches"] for s in summaries),
        "batches_per_s": round(batches / args.seconds, 1),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "create_run_p50_ms": percentile([s["create_run_ms"] for s in summaries], 50),
        "failed_requests": sum(s["failed_requests"] for s in summaries),
        "errors_by_kind": dict(server_errors.most_common()),
        "errors_reaching_training": sum(training_errors.values()),
        "training_errors_by_kind": dict(training_errors.most_common()),
        "points_sent": sent, "system_points_sent": sum(s["system_points_sent"] for s in summaries),
        "points_returned": returned, "points_lost": sent - returned,
        "points_duplicated": sum(s["points_duplicated"] for s in summaries),
        "registrations": sum(s["registered"] for s in summaries),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the clients send metrics")
    parser.add_argument("--restart-at", type=float, default=None, help="restart the server this many seconds in")
    parser.add_argument("--procs", type=int, default=4, help="client processes (the clients are their threads)")
    parser.add_argument("--system-every", type=int, default=10, help="a system-metrics batch every N batches")
    parser.add_argument("--retry-s", type=float, default=None,
                        help="a failed batch's retry interval (default: the training metric thread's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # a SIGTERM (timeout, Ctrl-C's cousin) still stops the servers: the finally blocks run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.clients < 1 or args.seconds <= 0 or not (args.restart_at is None or 0 < args.restart_at < args.seconds):
        parser.error("--clients >= 1, --seconds > 0, and --restart-at inside the run")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        from maskdit.core.storage import put_bytes

        put_bytes(str(args.out), (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

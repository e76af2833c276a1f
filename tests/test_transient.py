"""Issue 29.1: transient is not permanent, and permanent is not transient (maskdit/core/errors.py, retry.py).

A service that is down, times out, answers 5xx or is overloaded is retried in process within
MASKDIT_RETRY_BUDGET_S, then exits 143 (Kubernetes restarts the pod); an error the user must fix
exits 2 at once, in one line. The outages are real: the MLflow server and SeaweedFS of
tests/fixtures are stopped and restarted (same port, same data) while a step talks to them.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import typer

from maskdit.core import storage
from maskdit.core.errors import (
    EXIT_RETRYABLE,
    EXIT_USER_ERROR,
    ServiceUnavailable,
    UserError,
    exit_for_restart_policy,
    exit_on_user_error,
)
from maskdit.core.retry import retrying
from maskdit.core.storage import StorageError, StorageUnavailable
from maskdit.core.tracking_server import (
    TrackingError,
    TrackingUnavailable,
    check_reachable,
)


def _closed_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------ the classification


@pytest.mark.parametrize("wrapper", [exit_on_user_error, exit_for_restart_policy])
@pytest.mark.parametrize(("cls", "code"), [(StorageUnavailable, EXIT_RETRYABLE), (TrackingUnavailable, EXIT_RETRYABLE),
                                           (StorageError, EXIT_USER_ERROR), (TrackingError, EXIT_USER_ERROR)])
def test_every_command_wrapper_exits_by_the_one_classification(wrapper, cls, code, capsys):
    with pytest.raises(typer.Exit) as info, wrapper():
        raise cls("MLflow at http://m is unreachable")
    assert info.value.exit_code == code
    assert capsys.readouterr().err.strip() == "MLflow at http://m is unreachable"  # one line, no traceback


def test_retrying_gives_up_on_a_permanent_error_at_once_and_on_a_transient_one_after_its_budget():
    calls = []

    def permanent():
        calls.append(time.monotonic())
        raise StorageError("bucket 'b' does not exist; create it")

    with pytest.raises(StorageError):
        retrying(permanent, "test", budget=30)
    assert len(calls) == 1  # not retried

    calls.clear()

    def down():
        calls.append(time.monotonic())
        raise StorageUnavailable("endpoint is unreachable")

    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="still failing after 1.5 s of retries") as info:
        retrying(down, "test", budget=1.5)
    # waits of 0.25-0.5, 0.5-1 s ... within the budget: at least 2 tries, and never much past the budget
    assert len(calls) >= 2 and 1.5 <= time.monotonic() - started < 1.5 + 0.5
    assert isinstance(info.value, ServiceUnavailable) and info.value.exit_code == EXIT_RETRYABLE


# ------------------------------------------------------------------------------ the object store


@pytest.mark.slow
def test_a_store_outage_shorter_than_the_budget_loses_nothing(bucket, s3_env, monkeypatch):
    """SeaweedFS killed in the middle of a run of writes and reads, back after ~1 s (plus its start):
    every write lands and every read returns its bytes, with no error."""
    monkeypatch.setenv("MASKDIT_RETRY_BUDGET_S", "120")
    weed = s3_env.process
    uris = [f"s3://{bucket}/outage/{i}.bin" for i in range(6)]
    storage.put_bytes(uris[0], b"0")
    weed.stop()
    restart = _later(1.0, weed.start)  # "starts late": the next call meets a closed port
    try:
        for i, uri in enumerate(uris[1:], start=1):  # put_fileobj: how a checkpoint is written
            storage.put_fileobj(io.BytesIO(str(i).encode()), uri)
        assert [storage.get_bytes(uri) for uri in uris] == [str(i).encode() for i in range(6)]
        assert storage.list_uris(f"s3://{bucket}/outage") == sorted(uris)
    finally:
        restart.join()
        if weed._process is None:
            weed.start()


@pytest.mark.slow
def test_a_store_outage_longer_than_the_budget_exits_143_never_2(bucket, s3_env, tmp_path):
    """The budget spent, a step's read is one line and exit 143 (retryable), not 2 (permanent)."""
    weed = s3_env.process
    storage.put_bytes(f"s3://{bucket}/eval/result.json", b"{}")
    weed.stop()
    try:
        script = ("import sys, typer\nfrom maskdit.core import storage\nfrom maskdit.core.errors import "
                  "exit_on_user_error\ntry:\n    with exit_on_user_error():\n"
                  f"        storage.get_bytes('s3://{bucket}/eval/result.json')\n"
                  "except typer.Exit as e:\n    sys.exit(e.exit_code)\n")
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MASKDIT_RETRY_BUDGET_S": "2"}, check=False)
        assert proc.returncode == EXIT_RETRYABLE, proc.stderr
        assert time.monotonic() - started < 60
        errors = [line for line in proc.stderr.splitlines() if "Traceback" in line or "retrying in" not in line]
        assert len(errors) == 1 and "is unreachable" in errors[0] and "still failing after 2 s" in errors[0]
    finally:
        weed.start()
    # the permanent error next to it: a bucket that does not exist exits 2 at once
    with pytest.raises(StorageError) as info:
        retrying(lambda: storage.get_bytes("s3://no-such-bucket-29/x"), "test", budget=60)
    assert not isinstance(info.value, ServiceUnavailable)


# ------------------------------------------------------------------------------ MLflow


@pytest.mark.slow
def test_mlflow_down_when_a_run_starts_is_waited_for(mlflow_server_process, monkeypatch):
    """The MLflow pod being rescheduled (`Recreate`) as training starts: the run starts once it is back."""
    import mlflow

    from maskdit.core import tracking

    monkeypatch.setenv("MASKDIT_RETRY_BUDGET_S", "120")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = mlflow_server_process
    server.stop()
    restart = _later(1.0, server.start)
    try:
        with tracking.tracking_run("late", {"lr": 0.1}, uri=server.uri, experiment="outage") as run_id:
            tracking.log_metrics({"loss": 1.0}, step=1)
        run = mlflow.MlflowClient(server.uri).get_run(run_id)
        assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
    finally:
        restart.join()
        if not server.running:
            server.start()


def test_mlflow_down_past_the_budget_is_transient_one_line():
    uri = f"http://u:pw-29@127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        check_reachable(uri, budget=1)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "is unreachable" in message and "\n" not in message and "pw-29" not in message
    assert info.value.exit_code == EXIT_RETRYABLE


class _Answer(http.server.BaseHTTPRequestHandler):
    """What a URI that is not (only) MLflow answers: set per server as `status`, `body`, `content_type`."""

    def do_GET(self):
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.end_headers()
        self.wfile.write(self.server.body.encode())
        self.server.hits += 1

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def answering():
    servers = []

    def serve(status: int, body: str, content_type: str = "application/json") -> tuple[str, http.server.HTTPServer]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
        server.status, server.body, server.content_type, server.hits = status, body, content_type, 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield serve
    for server in servers:
        server.shutdown()


def test_a_tracking_uri_answering_html_is_permanent_at_once(answering):
    """Issue 29.1: an MLflow URI that answers HTML (a UI, a login page) exited 143 with a traceback."""
    uri, server = answering(200, "<!DOCTYPE html><html><body>Sign in</body></html>", "text/html")
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_reachable(uri, budget=60)
    assert time.monotonic() - started < 5 and server.hits == 1  # not retried
    assert not isinstance(info.value, ServiceUnavailable) and "answers HTML" in str(info.value)


@pytest.mark.parametrize(("status", "body"), [
    (400, json.dumps({"error_code": "BAD_REQUEST", "message": "(sqlalchemy.exc.TimeoutError) QueuePool limit of "
                      "size 5 overflow 10 reached, connection timed out, timeout 30.00"})),
    (503, "upstream connect error"), (429, "slow down"), (502, "<html>Bad Gateway</html>")])
def test_an_overloaded_or_failing_server_is_transient(answering, status, body):
    """MLflow's pool exhaustion comes as a 400; it and 5xx / 429 are retried, then exit 143. The same answers are
    transient for the REST calls of `maskdit mlflow-user` (one rule: tracking_server.busy_answer)."""
    from maskdit.core.tracking_users import _Api

    uri, server = answering(status, body)
    with pytest.raises(TrackingUnavailable):
        check_reachable(uri, budget=1)
    assert server.hits >= 2  # retried within the budget
    with pytest.raises(TrackingUnavailable, match=f"HTTP {status}"):
        _Api(uri, "admin", "secret").call("GET", "/api/2.0/mlflow/users/get", params={"username": "u"})


def test_a_server_that_does_not_implement_a_call_is_not_waited_for(answering):
    """A 501 no retry changes: the probe says so at once, a REST call gets the answer, a client error is permanent."""
    from mlflow.exceptions import RestException

    from maskdit.core.tracking_server import is_transient
    from maskdit.core.tracking_users import _Api

    uri, server = answering(501, json.dumps({"error_code": "NOT_IMPLEMENTED", "message": "no"}))
    with pytest.raises(TrackingError, match="answered HTTP 501") as info:
        check_reachable(uri, budget=60)
    assert not isinstance(info.value, ServiceUnavailable) and server.hits == 1
    assert _Api(uri, "admin", "secret").call("GET", "/api/2.0/mlflow/users/get")[0] == 501
    assert not is_transient(RestException({"error_code": "NOT_IMPLEMENTED", "message": "no"}))


def test_a_successful_answer_is_never_busy_whatever_it_names(answering):
    """An experiment named after an overload ("QueuePool limit") in a 200 answer is MLflow answering, not MLflow
    overloaded: the probe passes at once, the REST call returns it; the same words in a 400 are an overload."""
    from maskdit.core.tracking_server import busy_answer
    from maskdit.core.tracking_users import _Api

    named = "QueuePool limit reached, too many connections"
    body = json.dumps({"experiments": [{"experiment_id": "1", "name": named}]})
    uri, server = answering(200, body)
    check_reachable(uri, budget=60)
    assert server.hits == 1
    assert _Api(uri, "admin", "secret").call("GET", "/api/2.0/mlflow/experiments/search")[0] == 200
    assert not busy_answer(200, body) and busy_answer(400, body) and busy_answer(None, body)


def test_mlflow_failures_are_classified_from_the_client_errors():
    from mlflow.exceptions import MlflowException

    from maskdit.core.tracking_server import mlflow_failure

    overload = MlflowException("INVALID_PARAMETER_VALUE: QueuePool limit of size 5 overflow 10 reached")
    assert isinstance(mlflow_failure(overload, TrackingError, "x"), TrackingUnavailable)
    refused = MlflowException("Invalid artifact path: '../x'", error_code="INVALID_PARAMETER_VALUE")
    failure = mlflow_failure(refused, UserError, "cannot read models:/m/1/../x")
    assert type(failure) is UserError and "Invalid artifact path" in str(failure)
    missing = MlflowException("Registered Model with name=m not found", error_code="RESOURCE_DOES_NOT_EXIST")
    assert not isinstance(mlflow_failure(missing, UserError, "x"), ServiceUnavailable)
    down = MlflowException("API request to http://m/api failed with exception HTTPConnectionPool(host='m', "
                           "port=5000): Max retries exceeded with url: /api (Caused by NewConnectionError: "
                           "Failed to establish a new connection: [Errno 111] Connection refused)")
    assert isinstance(mlflow_failure(down, UserError, "x"), TrackingUnavailable)



def test_artifact_transfer_failures_say_what_to_check():
    """Model files moving to or from MLflow (maskdit register, downloads of models:/): a server error on a proxied
    file names the spool and the multipart setting; a multipart part the store did not serve names the store's
    address (transient), one it refused with a 4xx is permanent. tests/test_mlflow_spool.py has the real server."""
    from mlflow.exceptions import MlflowException

    from maskdit.core.tracking_server import transfer_failure

    proxied = MlflowException("The following failures occurred while downloading one or more artifacts from "
                              "http://m/api/2.0/mlflow-artifacts/artifacts/1/models/m-1/artifacts:\n##### File "
                              "ema.safetensors #####\nAPI request to http://m/api/2.0/mlflow-artifacts/artifacts/1/m"
                              "odels/m-1/artifacts/ema.safetensors failed with exception HTTPConnectionPool(host='m', "
                              "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 500 "
                              "error responses'))")
    failure = transfer_failure(proxied, UserError, "cannot read models:/m/1", "DOWNLOAD")
    assert isinstance(failure, TrackingUnavailable) and "\n" not in str(failure)
    assert "too many 500 error responses" in str(failure) and "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=true" in str(
        failure) and "/tmp" in str(failure)
    chunks = MlflowException("Failed to download 3 chunk(s) for artifacts/ema.safetensors after all retries exhausted.")
    failure = transfer_failure(chunks, UserError, "cannot read models:/m/1", "DOWNLOAD")
    assert isinstance(failure, TrackingUnavailable) and "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false" in str(failure)
    assert "MLFLOW_S3_ENDPOINT_URL" in str(failure)
    parts = "Failed to upload at least one part of /tmp/x/ema.safetensors. Errors: {1: \"HTTPError('{} for url: s3')\"}"
    refused = transfer_failure(MlflowException(parts.replace("{}", "403 Client Error: Forbidden")), UserError, "x", "UPLOAD")
    assert type(refused) is UserError and "refused the multipart upload" in str(refused)
    dropped = MlflowException(parts.replace("{}", "ConnectionError: [Errno 104] Connection reset by peer"))
    assert isinstance(transfer_failure(dropped, UserError, "x", "UPLOAD"), TrackingUnavailable)
    unknown = MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model with name=m not found")
    assert type(transfer_failure(unknown, UserError, "x", "DOWNLOAD")) is UserError

@pytest.mark.slow
def test_a_registry_read_refused_is_permanent_and_a_registry_outage_transient(tracking, mlflow_server_process,
                                                                             tmp_path):
    """Issue 29.1: a models:/ artifact path the server refuses exited 143 with a traceback; with the server
    down, the same read is retried and then transient."""
    from maskdit.method.modelformat import ModelFormatError, download

    client = tracking
    experiment = client.create_experiment(f"registry-{time.time_ns()}")
    run = client.create_run(experiment)
    (tmp_path / "weights.txt").write_text("w")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
    name = f"refused-{time.time_ns()}"
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert download(f"models:/{name}/1/weights.txt", str(tmp_path / "ok")).read_text() == "w"
    for path in (f"models:/{name}/1/../../../../etc/passwd", f"models:/{name}/7/weights.txt", "models:/absent/1/x"):
        started = time.monotonic()
        with pytest.raises(ModelFormatError) as info:
            download(path, str(tmp_path / "refused"))
        assert time.monotonic() - started < 10 and not isinstance(info.value, ServiceUnavailable)
        assert "\n" not in str(info.value) and info.value.exit_code == EXIT_USER_ERROR
    mlflow_server_process.stop()
    try:
        with pytest.raises(TrackingUnavailable) as info:
            download(f"models:/{name}/1/weights.txt", str(tmp_path / "down"))
        assert info.value.exit_code == EXIT_RETRYABLE and "\n" not in str(info.value)
    finally:
        mlflow_server_process.start()

"""The MLflow server a process talks to: its URI, its credentials, and whether it answers.

- tracking URI: env MLFLOW_TRACKING_URI, else the configured one, else no tracking at all;
- credentials in a tracking URI (`http://user:password@host`) are moved into MLflow's
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`connect`), so neither MLflow nor maskdit
  prints, logs or stores them;
- an unreachable server at the start is one line (`check_reachable`, a `TrackingError`), never
  minutes of retries and a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit, urlunsplit

from maskdit.core.errors import UserError
from maskdit.core.storage import redact

REQUEST_TIMEOUT_S = 10  # one HTTP request to MLflow from the metric thread or the reachability check


class TrackingError(UserError, RuntimeError):
    """The MLflow server cannot be reached or refuses us; the message names it and what to check."""


def tracking_uri(configured: str | None = None) -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or None


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


def error_reason(error: BaseException) -> str:
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
                                max_retries=retries, backoff_factor=1, timeout=REQUEST_TIMEOUT_S,
                                raise_on_status=False, params={"max_results": 1})
    except Exception as error:  # noqa: BLE001 - requests and MLflow wrap connection errors in many types
        raise TrackingError(f"MLflow at {redact(uri)} is unreachable ({error_reason(error)}); start the server or "
                            "fix MLFLOW_TRACKING_URI / tracking.uri (unset both to run without tracking)") from None
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


def quick_requests():
    """MLflow calls in this block try once, for at most a few seconds (the server is known to be down)."""
    return environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)})

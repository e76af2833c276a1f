"""The MLflow server a process talks to: its URI, its credentials, and whether it answers.

- tracking URI: env MLFLOW_TRACKING_URI, else the configured one, else no tracking at all;
- credentials in a tracking URI (`http://user:password@host`) are moved into MLflow's
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`connect`), so neither MLflow nor maskdit
  prints, logs or stores them;
- an unreachable server at the start is one line (`check_reachable`), never a traceback;
- every MLflow failure is classified once (`mlflow_failure`): down, timed out, 5xx, 429 or overloaded
  (`QueuePool limit ... reached`, which MLflow answers as a 400) is a `TrackingUnavailable`
  (transient: retried within the budget of maskdit/core/retry.py, then exit 143); refused credentials,
  an unknown model or path, a URI that answers HTML instead of MLflow's JSON is permanent (exit 2);
- a model's files moving to or from MLflow's artifact store (`transfer_failure`) are classified the same
  way, and the line adds what to check: a file the server proxies is spooled whole under its /tmp (a
  server error there is often that spool overflowing), one moved by multipart goes straight between
  this process and the object store through URLs the server presigns (docs/operating.md, "MLflow at
  model size").
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit, urlunsplit

from maskdit.core.errors import ServiceUnavailable, UserError
from maskdit.core.retry import retrying
from maskdit.core.storage import redact

REQUEST_TIMEOUT_S = 10  # one HTTP request to MLflow from the metric thread or the reachability check


class TrackingError(UserError, RuntimeError):
    """The MLflow server cannot be reached or refuses us; the message names it and what to check."""


class TrackingUnavailable(ServiceUnavailable, TrackingError):
    """MLflow is down, timed out, answered 5xx / 429, or is overloaded: transient (exit 143 after retries)."""


# an overloaded server's answers (MLflow reports its database pool running dry as 400 BAD_REQUEST)
_OVERLOAD = re.compile(r"QueuePool limit|database is locked|too many connections|TEMPORARILY_UNAVAILABLE|"
                       r"RESOURCE_EXHAUSTED|REQUEST_LIMIT_EXCEEDED", re.IGNORECASE)
# a request that never got an answer (requests / urllib3 wrap these in many types and messages)
_NO_ANSWER = re.compile(r"Max retries exceeded|Connection refused|Connection reset|Connection aborted|"
                        r"RemoteDisconnected|Failed to establish|timed out|Timeout|Name or service not known|"
                        r"Temporary failure in name resolution|too many (500|502|503|504|429) error", re.IGNORECASE)


def _status(error: BaseException) -> int | None:
    """The HTTP status the server answered, if it answered: a requests error's response, MLflow's
    RestException (the server's JSON error) or its "failed with error code N" (a non-JSON answer).
    A plain MlflowException carries no answer (its default code maps to 500 even for client errors)."""
    from mlflow.exceptions import RestException

    response = getattr(error, "response", None)
    if getattr(response, "status_code", None) is not None:
        return int(response.status_code)
    if isinstance(error, RestException):
        return int(error.get_http_status_code())
    found = re.search(r"failed with error code (\d{3})", str(error))
    return int(found.group(1)) if found else None


def busy_answer(status: int | None, body: str = "") -> bool:
    """Whether an HTTP answer of MLflow means "down or busy: try again": a 5xx but 501 (not implemented, which
    no retry changes), a 429, or an error (or an error of unknown status) whose text is an overload (MLflow
    answers its database pool running dry as 400). A successful answer is never busy, whatever its content (an
    experiment may be named "too many connections"). The one rule for every way maskdit talks to MLflow: the
    client's errors, the probe and the REST calls."""
    if status is not None and ((status >= 500 and status != 501) or status == 429):
        return True
    return (status is None or status >= 400) and _OVERLOAD.search(body) is not None


def is_transient(error: BaseException) -> bool:
    """Whether an MLflow client error means "the server is down or busy: try again"."""
    text = str(error)
    status = _status(error)
    if busy_answer(status, text):
        return True
    if status is not None and status >= 400:
        return False
    import requests

    return isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)) or \
        (status is None and _NO_ANSWER.search(text) is not None)


def _html(text: str) -> bool:
    return re.search(r"<(!doctype|html|head|body)\b", text, re.IGNORECASE) is not None


def mlflow_failure(error: BaseException, permanent: type[UserError], what: str) -> UserError:
    """`error` from an MLflow call as a one-line `TrackingUnavailable` (transient) or `permanent(...)`."""
    message = getattr(error, "message", None) or str(error)
    if is_transient(error):
        return TrackingUnavailable(f"{what}: MLflow is unavailable ({error_reason(error)}); it is retried, and the "
                                   "step restarted if it stays down")
    refused = refusal(error, what)
    if refused is not None:
        return permanent(refused)
    if _html(message) or re.search(r"JSONDecodeError|Expecting value|not in a valid JSON format", message):
        return permanent(f"{what}: the tracking URI answers HTML, not MLflow's API; is MLFLOW_TRACKING_URI / "
                         "tracking.uri the MLflow server's address (not its UI behind a proxy or login page)?")
    return permanent(f"{what}: {redact(' '.join(message.split()) or type(error).__name__)[:300]}")


# a failure of MLflow's artifact proxy (the file went through the server) or of a multipart transfer (it went
# straight to the object store through presigned URLs), as MLflow's HttpArtifactRepository words them
_PROXIED = re.compile(r"mlflow-artifacts/artifacts/")
_MULTIPART = re.compile(r"Failed to upload at least one part|Failed to download \d+ chunk")
_REFUSED = re.compile(r"\b4(?!29)\d\d Client Error")  # a part the store refused (403: a bad signature)


def transfer_failure(error: BaseException, permanent: type[UserError], what: str, direction: str) -> UserError:
    """`mlflow_failure` of an artifact upload or download (`direction`: "UPLOAD" or "DOWNLOAD") as one line
    that says what to check: the server's spool for a proxied file, the object store's address for multipart."""
    setting = f"MLFLOW_ENABLE_PROXY_MULTIPART_{direction}"
    text = " ".join(str(error).split())
    if _MULTIPART.search(text):  # a part the object store did not take or serve (MLflow logs each part's cause)
        check = (f"this process must reach the store at the address the MLflow server presigns for (its "
                 f"MLFLOW_S3_ENDPOINT_URL), and the store accept presigned multipart; outside the cluster set {setting}=false")
        if _REFUSED.search(text):
            return permanent(f"{what}: the object store refused the multipart {direction.lower()} "
                             f"({redact(text[:200])}); {check}")
        return TrackingUnavailable(f"{what}: the object store did not complete the multipart {direction.lower()} "
                                   f"({redact(text[:160])}); it is retried, and the step restarted if it fails "
                                   f"again; {check}")
    failure = mlflow_failure(error, permanent, what)
    if isinstance(failure, TrackingUnavailable) and _PROXIED.search(text):
        failure.args = (f"{failure}. The file went through the MLflow server, which spools it whole under its /tmp: "
                        f"if this repeats, set {setting}=true (maskdit-config does) or give the server's /tmp room "
                        "for it (docs/operating.md, MLflow at model size)"),
    return failure


def refusal(error: BaseException, what: str) -> str | None:
    """The one line for a 401 (wrong name or password) or a 403 (the account may not do this); None otherwise."""
    status = _status(error)
    account = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none)"
    if status == 401:
        return (f"{what}: MLflow refused the account {account!r} (HTTP 401: wrong name or password); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the maskdit-mlflow Secret) to the "
                "pipeline's MLflow user (docs/operating.md, \"MLflow accounts\")")
    if status == 403:
        return (f"{what}: MLflow denied the account {account!r} (HTTP 403: no permission); an experiment or "
                "registered model someone else created needs a grant for it: add its name to the Job "
                "mlflow-pipeline-user (maskdit mlflow-user ensure --experiment/--model) or grant EDIT in MLflow's "
                "UI (docs/operating.md, \"MLflow accounts\")")
    return None


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
    text = " ".join(str(error).split())  # one line: MLflow lists a download's failures one per line
    found = (re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"(Read|Connect)TimeoutError|timed out", text)
             or re.search(r"too many \d{3} error responses", text))  # urllib3's retries of a 5xx / 429 ran out
    return redact(found.group(0).strip() if found else f"{type(error).__name__}: {text[:200]}")


def check_reachable(uri: str, budget: float | None = None) -> None:
    """Return once the MLflow server at `uri` answers its API; a down or busy one is retried within the
    budget (maskdit/core/retry.py) and then a `TrackingUnavailable`; one that refuses us or is no MLflow
    server (HTML, 404) a permanent `TrackingError`. One line either way."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return  # a local store (sqlite, file): nothing to reach
    retrying(lambda: _probe(uri), f"MLflow at {redact(uri)}", budget)


def _probe(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = ("start the server or fix MLFLOW_TRACKING_URI / tracking.uri (unset both to run without tracking)")
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, backoff_factor=0, timeout=REQUEST_TIMEOUT_S,
                                raise_on_status=False, params={"max_results": 1})
    except Exception as error:  # noqa: BLE001 - requests and MLflow wrap connection errors in many types
        raise TrackingUnavailable(f"MLflow at {redact(uri)} is unreachable ({error_reason(error)}); {fix}") from None
    code, body = response.status_code, response.text[:2000]
    if code in (401, 403):
        raise TrackingError(f"MLflow at {redact(uri)} refused us (HTTP {code}); set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the maskdit-mlflow Secret: the "
                            "pipeline's MLflow user)")
    if busy_answer(code, body):
        raise TrackingUnavailable(f"MLflow at {redact(uri)} is unavailable (HTTP {code}: {redact(body[:200])!r})")
    if code >= 400:
        raise TrackingError(f"{redact(uri)} answered HTTP {code} to an MLflow API call; is "
                            "MLFLOW_TRACKING_URI / tracking.uri the MLflow server's address?")
    try:
        response.json()
    except ValueError:
        raise TrackingError(f"{redact(uri)} answers HTML (or other non-JSON) to an MLflow API call; is "
                            "MLFLOW_TRACKING_URI / tracking.uri the MLflow server's address (not its UI behind a "
                            "proxy or login page)?") from None


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

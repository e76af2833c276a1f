"""The launcher's Kubernetes API calls: each with its own timeout, transient failures retried until a deadline.

Transient (retried with exponential backoff and jitter, honouring Retry-After): connection errors and resets,
a dropped or cut response, per-call timeouts (urllib3's, the SDK's TimeoutError), HTTP 429 and 5xx.
Permanent (raised at once, `api_message` gives the API server's words): every other HTTP status (400, 401, 403,
404, 409, 422, ...) and a TLS certificate the client does not trust.
When the next try would start after the deadline, `OutOfTime` is raised with the last error.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import random
import sys
import time

TRANSIENT_STATUS = {429, 500, 502, 503, 504}
BACKOFF_MAX_S = 30.0


class OutOfTime(Exception):
    """The deadline came while a call was still failing (or while waiting)."""

    def __init__(self, what: str, error: BaseException | None):
        super().__init__(f"{what}: {describe(error)}" if error else what)
        self.error = error


def _chain(error: BaseException | None):
    """The error, its causes and contexts, and what a urllib3 MaxRetryError wraps (`reason`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        reason = getattr(error, "reason", None)
        error = error.__cause__ or error.__context__ or (reason if isinstance(reason, BaseException) else None)


def http_status(error: BaseException | None) -> int | None:
    """The HTTP status of a failed call (an ApiException anywhere in its chain), else None."""
    for e in _chain(error):
        if isinstance(getattr(e, "status", None), int) and e.status:
            return e.status
    return None


def api_message(error: BaseException) -> str:
    """The API server's own words for a failed request (its Status message), else the error text."""
    for e in _chain(error):
        body = getattr(e, "body", None)
        if body:
            try:
                status = json.loads(body)
                return f"HTTP {status['code']} {status['reason']}: {status['message']}"
            except (ValueError, KeyError, TypeError):
                return f"HTTP {getattr(e, 'status', '?')}: {body[:500]!r}"
    return describe(error)


def describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    status = http_status(error)
    if status:
        return api_message(error) if getattr(error, "body", None) else f"HTTP {status}"
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def is_transient(error: BaseException) -> bool:
    """Whether retrying the call may help (see the module docstring)."""
    import urllib3

    status = http_status(error)
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    for e in _chain(error):
        if isinstance(e, urllib3.exceptions.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, multiprocessing.TimeoutError, http.client.HTTPException,
                          urllib3.exceptions.HTTPError, OSError)):
            return True
    return getattr(error, "status", None) == 0  # kubernetes' ApiException(status=0): a TLS failure mid-handshake


def _retry_after(error: BaseException) -> float:
    for e in _chain(error):
        headers = getattr(e, "headers", None)
        if headers:
            try:
                return float(dict(headers).get("Retry-After", 0))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


class Calls:
    """The API calls of one launch through a TrainingClient's kubernetes clients (`custom_api`, `core_api`),
    on jobs of one kind (a components/jobkind.JobKind; `with_kind` gives the same calls on another)."""

    def __init__(self, api, namespace: str, *, kind=None, call_timeout_s: float = 30.0, backoff_s: float = 1.0,
                 out=None):
        self.api = api
        self.custom, self.core = api.custom_api, api.core_api
        self.namespace = namespace
        self.kind = kind
        self.call_timeout_s = call_timeout_s
        self.backoff_s = backoff_s
        self.out = out or sys.stdout

    def with_kind(self, kind) -> Calls:
        return Calls(self.api, self.namespace, kind=kind, call_timeout_s=self.call_timeout_s,
                     backoff_s=self.backoff_s, out=self.out)

    def call(self, what: str, fn, *args, until: float, timeout: tuple | None = None, **kwargs):
        """`fn(*args, **kwargs)` with a per-call timeout, retried while transient and before `until` (monotonic)."""
        attempt = 0
        while True:
            try:
                return fn(*args, _request_timeout=timeout or (self.call_timeout_s, self.call_timeout_s), **kwargs)
            except Exception as error:
                if not is_transient(error):
                    raise
                delay = min(BACKOFF_MAX_S, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
                delay = max(delay, min(_retry_after(error), BACKOFF_MAX_S))
                if time.monotonic() + delay >= until:
                    raise OutOfTime(what, error) from error
                print(f"[launcher] {what}: {describe(error)}; retrying in {delay:.1f}s", file=self.out, flush=True)
                time.sleep(delay)
                attempt += 1

    def _json(self, response) -> dict:
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    # --- discovery ---
    def served(self, kind, *, until: float) -> bool:
        """Whether the API server serves `kind` (its group/version lists the plural); 404 = not installed."""
        def get_raw(_request_timeout):
            return self._json(self.core.api_client.call_api(
                f"/apis/{kind.group}/{kind.version}", "GET", {}, [], {"Accept": "application/json"},
                response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
                _preload_content=False, _request_timeout=_request_timeout))

        try:
            found = self.call(f"discover {kind.group}/{kind.version}", get_raw, until=until)
        except Exception as error:
            if http_status(error) == 404:
                return False
            raise
        return any(r.get("name") == kind.plural for r in found.get("resources") or [])

    # --- the jobs ---
    def _api(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def create_job(self, manifest: dict, *, until: float) -> dict:
        return self.call(f"create {self.kind.kind} {manifest['metadata']['name']}",
                         self.custom.create_namespaced_custom_object, *self._api(), manifest, until=until)

    def get_job(self, name: str, *, until: float) -> dict:
        return self.call(f"read {self.kind.kind} {name}", self.custom.get_namespaced_custom_object, *self._api(), name,
                         until=until)

    def list_jobs(self, selector: str, *, until: float) -> list[dict]:
        return self.call(f"list {self.kind.kind}s", self.custom.list_namespaced_custom_object, *self._api(),
                         label_selector=selector, until=until).get("items", [])

    def patch_job(self, name: str, patch: dict, *, until: float) -> dict:
        """A JSON merge patch (give `metadata.resourceVersion` to make it conditional: 409 if stale)."""
        return self.call(f"patch {self.kind.kind} {name}", self.custom.patch_namespaced_custom_object, *self._api(),
                         name, patch, until=until)

    def delete_job(self, name: str, *, until: float) -> None:
        self.call(f"delete {self.kind.kind} {name}", self.custom.delete_namespaced_custom_object, *self._api(), name,
                  until=until)

    # --- pods and logs (raw JSON and bytes: no client-side model validation, no JSON-parsing of log text) ---
    def get_pod(self, name: str, *, until: float) -> dict:
        def get_raw(**kwargs):
            return self._json(self.core.read_namespaced_pod(name, self.namespace, _preload_content=False, **kwargs))

        return self.call(f"read pod {name}", get_raw, until=until)

    def list_pods(self, selector: str, *, until: float) -> list[dict]:
        def list_raw(**kwargs):
            return self._json(self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                            _preload_content=False, **kwargs))

        return self.call(f"list pods {selector}", list_raw, until=until).get("items") or []

    def open_log(self, pod: str, query: list[tuple[str, str]], *, until: float, idle_s: float | None = None):
        """The pod's log as an unread urllib3 response (stream it); `idle_s` = read timeout between chunks."""
        def open_raw(_request_timeout):
            return self.core.api_client.call_api(
                "/api/v1/namespaces/{namespace}/pods/{name}/log", "GET", {"namespace": self.namespace, "name": pod},
                query, {"Accept": "text/plain"}, response_type="str", auth_settings=["BearerToken"],
                _return_http_data_only=True, _preload_content=False, _request_timeout=_request_timeout)

        timeout = (self.call_timeout_s, idle_s or self.call_timeout_s)
        return self.call(f"read the log of pod {pod}", open_raw, until=until, timeout=timeout)


def training_client(namespace: str | None = None, configuration=None):
    """A Kubeflow `TrainingClient`: in-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG, else
    ~/.kube/config).

    `configuration` (a kubernetes.client.Configuration) overrides both, e.g. for a stand-in server. urllib3's
    own silent retries are off: the launcher retries, with backoff, within its deadline."""
    import copy

    from kubeflow.training import TrainingClient
    from kubernetes import client, config

    from components.pytorchjob import KIND

    if configuration is None:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()  # re-reads the rotated service-account token
        else:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
    else:
        configuration = copy.deepcopy(configuration)
    configuration.retries = False
    kwargs = {"namespace": namespace} if namespace else {}  # of the client, only its API clients are used:
    return TrainingClient(client_configuration=configuration, job_kind=KIND, **kwargs)  # either kind

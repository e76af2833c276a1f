"""The pipeline's own MLflow account: created and kept in step by the admin, never the admin itself.

The MLflow server (basic-auth app) has one admin, whose name and password only its Deployment and
the `mlflow-pipeline-user` Job read (the Secret `maskdit-mlflow-admin`). Every pod of the pipeline
signs in as a plain user instead (the Secret `maskdit-mlflow`: MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD). `ensure_user` makes the server agree with that Secret, signed in as the
admin through MLflow's auth REST API; it is idempotent, so the Job runs it on every apply:

- the user is created when missing; when it exists and its password no longer signs in (the Secret
  was rotated), the password is set to the Secret's;
- an account that is an admin, or the admin's own name, is refused: the pipeline must not hold it;
- experiments and registered models named by the caller that exist and were created by someone else
  get an EDIT grant: what the pipeline does there (runs, metrics, model versions, the `candidate` /
  `champion` aliases) needs update rights, never delete or manage. What the user creates itself
  (its experiments, models, the champion lock `<name>.champion-lock`) it owns as MANAGE already, and
  everything else it reads with the server's `default_permission = READ` (k8s/base/mlflow-auth.ini):
  parent runs, `models:/<name>@champion` for a warm start. A grant never lowers a permission.

A server that is down or starting (the Job runs while MLflow rolls out) is retried within
MASKDIT_RETRY_BUDGET_S (maskdit/core/retry.py), then exit 143 and the Job's next pod tries again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from maskdit.core.errors import UserError
from maskdit.core.retry import retrying
from maskdit.core.storage import redact
from maskdit.core.tracking_server import (
    REQUEST_TIMEOUT_S,
    TrackingUnavailable,
    busy_answer,
    error_reason,
)

ADMIN_USERNAME_ENV, ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
GRANT = "EDIT"  # on others' experiments and models: runs, versions, aliases; no delete, no manage
SUFFICIENT = ("EDIT", "MANAGE")


class UserSetupError(UserError, RuntimeError):
    """The pipeline's MLflow account cannot be set up as asked; the message says what to change."""


@dataclass
class EnsuredUser:
    """What `ensure_user` did."""

    username: str
    created: bool = False
    password_updated: bool = False
    granted: list[str] = field(default_factory=list)  # "experiment maskdit (id 1)", "registered_model m"
    missing: list[str] = field(default_factory=list)  # named but not there: the user will own them

    def lines(self) -> list[str]:
        state = ("created" if self.created else "password updated" if self.password_updated
                 else "exists, password unchanged")
        out = [f"MLflow user {self.username!r}: {state}"]
        out += [f"granted {GRANT} on {what}" for what in self.granted]
        out += [f"{what} does not exist yet: {self.username!r} will own it when the pipeline creates it"
                for what in self.missing]
        return out


def _credentials(name_env: str, password_env: str, secret: str) -> tuple[str, str]:
    name, password = os.environ.get(name_env, ""), os.environ.get(password_env, "")
    if not name or not password:
        empty = " and ".join(k for k, v in ((name_env, name), (password_env, password)) if not v)
        raise UserSetupError(f"{empty} is empty: fill it in the Secret {secret} (docs/operating.md, "
                             "\"Fill in the secrets\")")
    return name, password


def ensure_from_env(uri: str | None = None, experiments: Sequence[str] = (), models: Sequence[str] = ()) -> EnsuredUser:
    """`ensure_user` with the URI and both accounts from the environment, as the Job sets them."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(uri).scheme not in ("http", "https"):
        raise UserSetupError(f"MLFLOW_TRACKING_URI is {redact(uri)!r}: set it to the MLflow server's http(s) "
                             "address (the ConfigMap maskdit-config)")
    admin = _credentials(ADMIN_USERNAME_ENV, ADMIN_PASSWORD_ENV, "maskdit-mlflow-admin")
    user = _credentials(USERNAME_ENV, PASSWORD_ENV, "maskdit-mlflow")
    return ensure_user(uri, admin, user, experiments=experiments, models=models)


class _Api:
    """MLflow's REST API as one account (explicit credentials: the process's env may hold another's)."""

    def __init__(self, uri: str, username: str, password: str):
        self.uri, self.username, self.password = uri.rstrip("/"), username, password

    def call(self, method: str, path: str, **kwargs):
        """(status, parsed JSON or text); a server that is down or busy (`busy_answer`: 5xx, 429, an overloaded
        database's 400) is a `TrackingUnavailable`."""
        from mlflow.utils.credentials import MlflowHostCreds
        from mlflow.utils.rest_utils import http_request

        creds = MlflowHostCreds(self.uri, username=self.username, password=self.password)
        try:
            response = http_request(creds, path, method, max_retries=0, backoff_factor=0,
                                    timeout=REQUEST_TIMEOUT_S, raise_on_status=False, **kwargs)
        except Exception as error:  # noqa: BLE001 - requests and MLflow wrap connection errors in many types
            raise TrackingUnavailable(f"MLflow at {redact(self.uri)} is unreachable ({error_reason(error)})") from None
        if busy_answer(response.status_code, response.text[:2000]):
            raise TrackingUnavailable(f"MLflow at {redact(self.uri)} is unavailable (HTTP {response.status_code}: "
                                      f"{redact(response.text[:200])!r})")
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text[:300]


def _fail(what: str, status: int, body) -> UserSetupError:
    return UserSetupError(f"{what}: MLflow answered HTTP {status} ({redact(str(body))[:200]!r})")


def ensure_user(uri: str, admin: tuple[str, str], user: tuple[str, str], *, experiments: Sequence[str] = (),
                models: Sequence[str] = ()) -> EnsuredUser:
    """Create or update the non-admin `user` (name, password) as `admin`, and grant EDIT on the named
    `experiments` / `models` it does not already own; see the module doc."""
    return retrying(lambda: _ensure(uri, admin, user, list(experiments), list(models)),
                    f"setting up the MLflow user at {redact(uri)}")


def _ensure(uri: str, admin: tuple[str, str], user: tuple[str, str], experiments: list[str],
            models: list[str]) -> EnsuredUser:
    username, password = user
    if username == admin[0]:
        raise UserSetupError(f"the pipeline's MLflow user {username!r} (MLFLOW_TRACKING_USERNAME, Secret "
                             "maskdit-mlflow) is the admin's name: give the pipeline its own account (another "
                             "name and password in k8s/secrets/mlflow.env)")
    as_admin, as_user = _Api(uri, *admin), _Api(uri, *user)
    status, body = as_admin.call("GET", "/api/2.0/mlflow/users/current")
    if status in (401, 403) or (status == 200 and not body["user"]["is_admin"]):
        raise UserSetupError(f"MLflow at {redact(uri)} does not accept {admin[0]!r} as its admin (HTTP {status}): "
                             "MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD (Secret maskdit-mlflow-admin) must be the "
                             "admin the server was first started with, or one it made admin later")
    if status != 200:
        raise _fail(f"{redact(uri)} is no MLflow server with the basic-auth app", status, body)
    result = EnsuredUser(username)
    status, body = as_admin.call("GET", "/api/2.0/mlflow/users/get", params={"username": username})
    if status == 404:
        status, body = as_admin.call("POST", "/api/2.0/mlflow/users/create",
                                     json={"username": username, "password": password})
        if status == 200:
            result.created = True
        elif not (isinstance(body, dict) and body.get("error_code") == "RESOURCE_ALREADY_EXISTS"):
            raise _fail(f"creating the MLflow user {username!r}", status, body)  # else: created by a racing Job
    elif status != 200:
        raise _fail(f"reading the MLflow user {username!r}", status, body)
    elif body["user"]["is_admin"]:
        raise UserSetupError(f"the MLflow user {username!r} (MLFLOW_TRACKING_USERNAME, Secret maskdit-mlflow) is an "
                             "admin: the pipeline must run as a plain user; name another account in "
                             "k8s/secrets/mlflow.env, or take the admin right away in MLflow's UI (Admin > Users)")
    if not result.created and as_user.call("GET", "/api/2.0/mlflow/users/current")[0] != 200:
        status, body = as_admin.call("PATCH", "/api/2.0/mlflow/users/update-password",
                                     json={"username": username, "password": password})
        if status != 200:
            raise _fail(f"setting the password of the MLflow user {username!r}", status, body)
        result.password_updated = True
    status, body = as_user.call("GET", "/api/2.0/mlflow/users/current")
    if status != 200:
        raise _fail(f"signing in as {username!r} with the password of the Secret maskdit-mlflow", status, body)
    for name in experiments:
        status, body = as_admin.call("GET", "/api/2.0/mlflow/experiments/get-by-name",
                                     params={"experiment_name": name})
        if status == 404:
            result.missing.append(f"experiment {name!r}")
        elif status != 200:
            raise _fail(f"looking up the experiment {name!r}", status, body)
        elif _grant(as_admin, username, "experiment", body["experiment"]["experiment_id"]):
            result.granted.append(f"experiment {name!r} (id {body['experiment']['experiment_id']})")
    for name in models:
        status, body = as_admin.call("GET", "/api/2.0/mlflow/registered-models/get", params={"name": name})
        if status == 404:
            result.missing.append(f"registered model {name!r}")
        elif status != 200:
            raise _fail(f"looking up the registered model {name!r}", status, body)
        elif _grant(as_admin, username, "registered_model", name):
            result.granted.append(f"registered model {name!r}")
    return result


def _grant(as_admin: _Api, username: str, resource_type: str, resource_id: str) -> bool:
    """EDIT on the resource unless the user holds EDIT or more already (its own: MANAGE); whether it granted."""
    key = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    status, body = as_admin.call("GET", "/api/3.0/mlflow/users/permissions/get", params=key)
    if status != 200:
        raise _fail(f"reading {username!r}'s permission on {resource_type} {resource_id!r}", status, body)
    if body.get("permission") in SUFFICIENT:
        return False
    status, body = as_admin.call("POST", "/api/3.0/mlflow/users/permissions/grant", json={**key, "permission": GRANT})
    if status != 200:
        raise _fail(f"granting {GRANT} on {resource_type} {resource_id!r} to {username!r}", status, body)
    return True

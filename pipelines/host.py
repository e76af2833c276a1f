"""Submitting to a KFP host: the run's parameters checked first, then every request with a deadline.

`run_arguments` checks `-p` values against the compiled package's inputs and every step's config
(components/parameters.py, the check the DAG's first steps repeat) before anything is sent, so a bad
value is refused on the operator's machine, not weeks later in a step pod. `kfp_client` gives each
request a connect and a read timeout (kfp.Client sets none: a host that accepts and never answers
would be waited for until killed), and turns a closed port, an unknown host, a bad URL or a refusal
into one line that says what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from maskdit.core.errors import UserError

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


def package_inputs(package: Path) -> dict[str, Any]:
    """The compiled pipeline's parameters and their defaults (None where it has none)."""
    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()))
        parameters = spec["root"]["inputDefinitions"]["parameters"]
    except OSError as error:
        raise UserError(f"cannot read the pipeline package {str(package)!r} ({error.strerror or error}): "
                        "compile it with `maskdit-pipeline compile` or pass --package") from None
    except (yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise UserError(f"{str(package)!r} is not a compiled KFP pipeline: compile it with `maskdit-pipeline "
                        "compile`") from None
    return {name: spec.get("defaultValue") for name, spec in parameters.items()}


def run_arguments(package: Path, arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` when the package takes each of them and every step accepts the run's values (UserError
    naming the parameter otherwise)."""
    from components.parameters import check_parameters

    inputs = package_inputs(package)
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise UserError(f"the pipeline in {package} has no parameter {', '.join(unknown)}: use one of "
                        f"{', '.join(sorted(inputs))}")
    values = {**inputs, **arguments}
    missing = sorted(name for name, value in values.items() if value is None)
    if missing:
        raise UserError(f"set the pipeline parameter(s) {', '.join(missing)} (-p key=value): they have no default")
    check_parameters(values)
    return arguments


def _where(host: str | None) -> str:
    return f"the KFP API at {host}" if host else "the in-cluster KFP API (no --host)"


@contextmanager
def kfp_client(host: str | None, connect_s: float = CONNECT_TIMEOUT_S, read_s: float = READ_TIMEOUT_S,
               token: str | None = None) -> Iterator:
    """A `kfp.Client` for `host` whose requests time out and carry `token` (multi-user KFP,
    pipelines/kfp_auth.py); a failure to reach or use the host is a UserError."""
    import kfp_server_api
    import requests
    import urllib3

    rest = kfp_server_api.rest.RESTClientObject
    original = rest.request

    def request(self, *args, _request_timeout=None, **kwargs):
        return original(self, *args, _request_timeout=_request_timeout or (connect_s, read_s), **kwargs)

    if host and "://" in host and host.partition("://")[0].lower() not in ("http", "https"):
        raise UserError(f"--host {host!r} is not an http(s) URL: use e.g. http://localhost:8080")
    hint = "check --host (e.g. http://localhost:8080 through `kubectl port-forward`) and that KFP is up"
    rest.request = request
    try:
        from pipelines.kfp_auth import client, kfp_errors

        with kfp_errors(host, token):  # a refused or missing token, an unreachable host: what to do
            yield client(host, token)
    except (urllib3.exceptions.LocationValueError, urllib3.exceptions.URLSchemeUnknown):
        raise UserError(f"--host {host!r} is not an http(s) URL: use e.g. http://localhost:8080") from None
    except urllib3.exceptions.HTTPError as error:
        reason = getattr(error, "reason", None) or error  # MaxRetryError: the last attempt's error
        if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
            raise UserError(f"{_where(host)} accepted the connection but sent no answer within {read_s:g} s: "
                            f"{hint} (or pass a longer --timeout)") from None
        raise UserError(f"cannot reach {_where(host)} ({type(reason).__name__}: {str(reason)[-200:]}): "
                        f"{hint}") from None
    except requests.exceptions.RequestException as error:
        raise UserError(f"cannot reach {_where(host)} ({type(error).__name__}): {hint}") from None
    except kfp_server_api.ApiException as error:
        what = {401: "not signed in: pass credentials", 403: "not allowed: check your namespace and its role "
                "bindings", 404: "not found: is this the KFP API (not the UI)?"}.get(error.status, "refused")
        raise UserError(f"{_where(host)} answered {error.status} {error.reason}: {what}") from None
    except TimeoutError as error:  # kfp's own health check gave up
        raise UserError(f"{_where(host)}: {error}; {hint}") from None
    finally:
        rest.request = original

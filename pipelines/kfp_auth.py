"""Signing in to Kubeflow Pipelines for `maskdit-pipeline submit|schedule`, and its failures as one line each.

Standalone KFP answers anyone who reaches it (`kubectl port-forward`). Multi-user Kubeflow puts KFP behind its
Istio ingress, which admits a request only with an identity: a Kubernetes service-account token whose audience
is `pipelines.kubeflow.org`, sent as `Authorization: Bearer <token>` (docs/operating.md). It comes from
`--token` (or MASKDIT_KFP_TOKEN, which keeps it out of the shell history) or `--token-file` (a projected
service-account token, e.g. /var/run/secrets/kubeflow/pipelines/token inside a notebook pod).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from maskdit.core.errors import UserError

TOKEN_ENV = "MASKDIT_KFP_TOKEN"
TOKEN_HINT = ("kubectl -n <your profile's namespace> create token default-editor --audience=pipelines.kubeflow.org")


class KfpAccessError(UserError, RuntimeError):
    """KFP could not be reached, or refused the credentials."""


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from `token` or the file `token_file` (not both), None for none."""
    if token and token_file:
        raise KfpAccessError("give either --token (or MASKDIT_KFP_TOKEN) or --token-file, not both")
    if token_file is None:
        return token.strip() or None if token else None
    try:
        text = token_file.read_text().strip()
    except OSError as error:
        raise KfpAccessError(f"--token-file {token_file}: cannot read it ({error.strerror}); mount the projected "
                             f"service-account token there or create one: {TOKEN_HINT}") from None
    if not text:
        raise KfpAccessError(f"--token-file {token_file} is empty: write a token into it ({TOKEN_HINT})")
    return text


def client(host: str | None, token: str | None):
    """A kfp.Client for `host` that sends `token` (if any) as the bearer token of every request, after one
    request that proves KFP answers and admits the token (kfp.Client's own check retries a refusal five times,
    25 s, with a traceback each): call it inside `kfp_errors`."""
    import kfp
    import kfp_server_api

    if host:  # (in-cluster, kfp.Client finds the address itself)
        config = kfp_server_api.Configuration(host=host)
        if token:
            config.api_key["authorization"], config.api_key_prefix["authorization"] = token, "Bearer"
        with kfp_server_api.ApiClient(config) as api:
            kfp_server_api.HealthzServiceApi(api).healthz_service_get_healthz()
    return kfp.Client(host=host, existing_token=token)


@contextmanager
def kfp_errors(host: str | None, token: str | None) -> Iterator[None]:
    """KFP's refusals and an unreachable host as a `KfpAccessError` naming the host and what to do."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError as Urllib3Error
    from urllib3.exceptions import ReadTimeoutError

    where = host or "the in-cluster KFP address"
    try:
        yield
    except ApiException as error:
        if error.status in (401, 403):
            said = "refused the token" if token else "asks who you are (no token was given)"
            raise KfpAccessError(
                f"KFP at {where} {said} (HTTP {error.status}: {(error.reason or '').strip()}): pass --token "
                f"(or {TOKEN_ENV}) or --token-file with a valid service-account token for your profile, e.g. "
                f"`{TOKEN_HINT}`, and check that --namespace is your profile") from None
        raise
    except Urllib3Error as error:
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, ReadTimeoutError):
            raise  # a host that accepts and never answers: pipelines/host.py says so, with the timeout
        raise KfpAccessError(f"cannot reach KFP at {where} ({type(reason).__name__}: {reason}): check --host "
                             f"(e.g. http://localhost:8080 through `kubectl port-forward`, or your Kubeflow "
                             f"ingress's https://<host>/pipeline)") from None

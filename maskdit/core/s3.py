"""The connection to S3 under `maskdit/core/storage.py`: the boto3 client, its settings and transfers.

boto3 finds the endpoint and credentials the standard AWS way (env, profile, IRSA;
`AWS_ENDPOINT_URL` for S3-compatible stores such as MinIO or SeaweedFS; path-style addressing is
used whenever an endpoint is set). Retries with backoff follow botocore's retry config: mode
`standard` and 5 attempts unless `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` say otherwise. Large
objects go through boto3's managed transfers: multipart uploads and parallel ranged GETs above
`SETTINGS.multipart_threshold`.

Only storage.py and upload.py (its streamed writes) call this module; everything else reads and writes
through storage's URI API.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import IO, Any

MiB = 1024 * 1024


@dataclass
class S3Settings:
    """Knobs of the S3 path; tests lower them to exercise multipart and pagination cheaply."""

    multipart_threshold: int = 64 * MiB  # objects at least this big go through multipart upload
    multipart_chunksize: int = 64 * MiB  # part size (S3 minimum: 5 MiB)
    max_concurrency: int = 8  # parallel parts / ranged GETs per transfer
    list_page_size: int = 1000  # MaxKeys of each ListObjectsV2 call
    connect_timeout: float = 10.0
    read_timeout: float = 120.0


SETTINGS = S3Settings()

_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS",
             "AWS_RETRY_MODE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()

# S3 error codes that mean the credentials (or the policy) refused the request
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "InvalidClientTokenId", "403", "Forbidden"}


# S3 error codes and HTTP statuses of a store that is busy or briefly failing: worth another try
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "ServiceUnavailable", "InternalError", "503", "500", "502", "504", "429"}
_TRANSIENT_TEXT = re.compile(r"Could not connect|Connect timeout|Read timeout|Connection was closed|"
                             r"EndpointConnectionError|ConnectionClosedError|Max retries exceeded|"
                             r"\b(SlowDown|ServiceUnavailable|InternalError|RequestTimeout)\b|\((500|502|503|504|429)\)")


def is_transient(code: str, status: int | None = None) -> bool:
    """Whether an S3 error code / HTTP status means "try again" (5xx, 429, throttling, a timeout)."""
    return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))


def is_transient_text(text: str) -> bool:
    """The same, for an error known only by its message (boto3's S3UploadFailedError wraps the cause)."""
    return _TRANSIENT_TEXT.search(text) is not None


def client():
    """A boto3 S3 client for the current environment (cached per process and environment)."""
    import boto3
    from botocore.config import Config

    key = (os.getpid(), tuple(os.environ.get(k) for k in _ENV_KEYS),
           SETTINGS.connect_timeout, SETTINGS.read_timeout)
    with _clients_lock:
        if key not in _clients:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            config = Config(
                retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                         "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))},
                connect_timeout=SETTINGS.connect_timeout,
                read_timeout=SETTINGS.read_timeout,
                max_pool_connections=max(10, SETTINGS.max_concurrency * 2),
                s3={"addressing_style": "path" if endpoint else "auto"},
            )
            session = boto3.session.Session()  # region: env, then profile, then us-east-1
            region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
            _clients[key] = session.client("s3", config=config, region_name=region)
        return _clients[key]


def endpoint() -> str:
    """The client's endpoint URL, for error messages; never raises."""
    try:
        return client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only used inside error messages
        return "<unknown endpoint>"


def transfer_config():
    """boto3's managed-transfer settings (multipart threshold, part size, threads) from SETTINGS."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=SETTINGS.multipart_threshold,
                          multipart_chunksize=SETTINGS.multipart_chunksize,
                          max_concurrency=SETTINGS.max_concurrency)


class KeepOpen:
    """A caller's stream handed to boto3, which closes what it uploads: here close() leaves it open."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass

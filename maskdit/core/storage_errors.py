"""What the storage API raises: its error classes, and botocore's many exceptions turned into them.

Permanent errors (`StorageError`: no such bucket, refused credentials) exit 2; `StorageUnavailable`
(no answer, a timeout, 5xx, throttling) is retried within the budget of maskdit/core/retry.py,
then exits 143; `NoSpaceError` (a full disk or a file-size limit) is permanent until someone acts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from maskdit.core import s3
from maskdit.core.errors import ServiceUnavailable, UserError


class StorageError(UserError, RuntimeError):
    """An object store or file system refused an operation; the message names URI and endpoint."""


class StorageUnavailable(ServiceUnavailable, StorageError):
    """The store did not answer, timed out, answered 5xx or throttled us: retried, then exit 143."""


class NoSpaceError(StorageError):
    """A local write failed for want of room (a full disk, a quota, a file-size limit): permanent until someone acts."""


class ObjectNotFound(StorageError):
    """The URI names no object (the bucket or folder exists)."""


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(str(uri))
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/KEY")
    return bucket, key




@contextmanager
def s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn botocore's many exceptions into one `StorageError` naming URI, endpoint and the fix."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0]
        where = f"{uri} (endpoint {s3.endpoint()})"
        if s3.is_transient(code, error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")):
            raise StorageUnavailable(f"cannot {action} {where}: the store answered {code} (busy or failing; "
                                     "transient)") from None
        if code == "NoSuchBucket":
            raise StorageError(f"cannot {action} {where}: bucket {bucket!r} does not exist; "
                               "create it or fix the URI") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ObjectNotFound(f"cannot {action} {where}: no such object") from None
        if code in s3.CREDENTIAL_CODES:
            raise StorageError(f"cannot {action} {where}: the credentials were rejected ({code}); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile / service "
                               "account) and the bucket policy") from None
        raise StorageError(f"cannot {action} {where}: {code}: {error}") from None
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise StorageError(f"cannot {action} {uri} (endpoint {s3.endpoint()}): {error}; set AWS_ACCESS_KEY_ID "
                           "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a service account role") from None
    except (ConnectionError, HTTPClientError) as error:  # refused, timed out, closed mid-answer
        raise StorageUnavailable(f"cannot {action} {uri}: endpoint {s3.endpoint()} is unreachable ({error}); "
                                 "check AWS_ENDPOINT_URL and the network") from None
    except S3UploadFailedError as error:
        kind = StorageUnavailable if s3.is_transient_text(str(error)) else StorageError
        raise kind(f"cannot {action} {uri} (endpoint {s3.endpoint()}): {error}") from None
    except BotoCoreError as error:
        raise StorageError(f"cannot {action} {uri} (endpoint {s3.endpoint()}): {error}") from None


def missing_bucket_check(uri: str, action: str) -> None:
    """After a bare 404 (HEAD has no body): raise if the bucket itself is missing."""
    from botocore.exceptions import ClientError

    bucket = split_s3(uri)[0]
    try:
        s3.client().head_bucket(Bucket=bucket)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"cannot {action} {uri} (endpoint {s3.endpoint()}): bucket {bucket!r} does not "
                               "exist; create it or fix the URI") from None
        with s3_errors(uri, action):
            raise

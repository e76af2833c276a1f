"""Errors a user can cause and fix, and how every command reports them.

Each area's error class (ConfigError, StorageError, ShardError, CheckpointError, ...) derives from
`UserError` as well as from ValueError or RuntimeError. A command wraps its work in
`exit_on_user_error()`: such an error prints its message (which names the value and what to do)
and exits with its `exit_code`, without a traceback; anything else is a bug and keeps its traceback.
Training, which Kubernetes restarts by exit code, wraps its body in `exit_for_restart_policy()` instead:
there a clean stop on SIGTERM and any failure that is not a UserError exit 143 (EXIT_RETRYABLE).

The one classification (docs/operating.md has the table):
- permanent (`UserError`, exit 2): the user must change something (config, data, credentials, a
  model that does not fit); the same input fails the same way again, so nothing retries it;
- transient (`ServiceUnavailable`, a `UserError` with exit 143): a service is down, timed out,
  answered 5xx, throttled us or is overloaded (MLflow's `QueuePool limit ... reached`). Retried in
  process first (`maskdit/core/retry.py`, jittered backoff within MASKDIT_RETRY_BUDGET_S), then one
  line and exit 143, so Kubernetes restarts the pod (`restartPolicy: ExitCode`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# Exit codes, as Kubernetes reads them under a PyTorchJob's `restartPolicy: ExitCode`:
# 1-127 are permanent (the pod is not restarted), 128-255 retryable (it is).
EXIT_USER_ERROR = 2  # bad config, data or environment: retrying cannot help
EXIT_RETRYABLE = 143  # stopped by SIGTERM (preemption, node drain) or a transient failure: resume helps


class UserError(Exception):
    """Bad input, configuration or environment; the message names the value and what to do."""

    exit_code = EXIT_USER_ERROR  # permanent: the user must change something


class ServiceUnavailable(UserError):
    """A service (MLflow, the object store) is down, timed out, answered 5xx or is overloaded: transient.

    Raised after the in-process retries (`maskdit.core.retry.retrying`) ran out of budget; exit 143.
    Each area subclasses it together with its own error class (StorageUnavailable, TrackingUnavailable).
    """

    exit_code = EXIT_RETRYABLE


def is_retryable_exit(code: int) -> bool:
    """Whether Kubernetes restarts a container that exited with `code` (`restartPolicy: ExitCode`):
    128-255 (a signal, 143) yes; 1-127 (2: a user error) no."""
    return code >= 128


class UsageError(UserError, ValueError):
    """A command-line value out of range where the option parser cannot check it."""


class Interrupted(KeyboardInterrupt):
    """Stopped cleanly on SIGTERM or SIGINT (a checkpoint was written); starting again resumes.

    A KeyboardInterrupt, as Python's own SIGINT is: no `except Exception` swallows it, and
    `tracking.tracking_run` closes the MLflow run as KILLED.
    """


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Run a command body: a `UserError` becomes its message on stderr and its exit code (2, or 143
    for a `ServiceUnavailable`)."""
    import typer

    try:
        yield
    except UserError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(error.exit_code) from None


@contextmanager
def exit_for_restart_policy() -> Iterator[None]:
    """Run a training command body, whose pod Kubernetes restarts by exit code (`restartPolicy: ExitCode`).

    - `UserError` (bad config, missing data, model mismatch, non-finite loss): its message, exit 2
      (permanent: the same input fails the same way again); a `ServiceUnavailable` (MLflow or the
      store down past the retry budget): its message, exit 143;
    - a stop on a signal (`Interrupted`, KeyboardInterrupt): exit 143 (retryable: the restart resumes);
    - any other exception (an NCCL or CUDA error, a lost peer, a network failure, also a bug): its
      traceback, exit 143; a bug then fails `backoffLimit` times before the job gives up.
    """
    import traceback

    import typer

    try:
        yield
    except typer.Exit:
        raise
    except UserError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as stop:
        typer.echo(str(stop) or "interrupted", err=True)
        raise typer.Exit(EXIT_RETRYABLE) from None
    except Exception:  # noqa: BLE001 - every other failure is worth a restart
        traceback.print_exc()
        typer.echo(f"exiting with {EXIT_RETRYABLE} (retryable): the restarted pod resumes from the newest "
                   "checkpoint", err=True)
        raise typer.Exit(EXIT_RETRYABLE) from None

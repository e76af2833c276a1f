"""Errors a user can cause and fix, and how every command reports them.

Each area's error class (ConfigError, StorageError, ShardError, CheckpointError, ...) derives from
`UserError` as well as from ValueError or RuntimeError. A command wraps its work in
`exit_on_user_error()`: such an error prints its message (which names the value and what to do)
and exits with code 2 (EXIT_USER_ERROR), without a traceback; anything else is a bug and keeps its traceback.
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


class UsageError(UserError, ValueError):
    """A command-line value out of range where the option parser cannot check it."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Run a command body: a `UserError` becomes its message on stderr and exit code 2."""
    import typer

    try:
        yield
    except UserError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None

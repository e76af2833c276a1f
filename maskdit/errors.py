"""Errors a user can cause and fix, and how every command reports them.

Each area's error class (ConfigError, StorageError, ShardError, CheckpointError, ...) derives from
`UserError` as well as from ValueError or RuntimeError. A command wraps its work in
`exit_on_user_error()`: such an error prints its message (which names the value and what to do)
and exits with code 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
        raise typer.Exit(2) from None

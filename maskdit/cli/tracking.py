"""`maskdit mlflow-user ensure`: the pipeline's own non-admin MLflow account, as the admin sets it up."""

from __future__ import annotations

from typing import Annotated

import typer

from maskdit.core.errors import exit_on_user_error

mlflow_user_app = typer.Typer(help="The pipeline's MLflow account (an admin's task).", no_args_is_help=True)


@mlflow_user_app.callback()
def main() -> None:
    """The pipeline's MLflow account (an admin's task)."""


@mlflow_user_app.command("ensure")
def ensure(
    experiment: Annotated[list[str] | None, typer.Option(
        "--experiment", help="An experiment the pipeline writes to that someone else may have created: EDIT on it "
        "when it exists (repeatable).")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="A registered model the pipeline registers versions of: EDIT on it when it exists and "
        "someone else created it (repeatable).")] = None,
) -> None:
    """Create the pipeline's MLflow user (MLFLOW_TRACKING_USERNAME / _PASSWORD) if missing, set its password when
    the Secret changed, and grant it EDIT on the named experiments and models; signed in as the admin
    (MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD) at MLFLOW_TRACKING_URI. Idempotent."""
    from maskdit.core.tracking_users import ensure_from_env

    with exit_on_user_error():
        result = ensure_from_env(experiments=experiment or [], models=model or [])
    for line in result.lines():
        typer.echo(line)

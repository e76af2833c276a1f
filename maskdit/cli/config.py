"""`maskdit config show | reference`: what a config resolves to, and every key there is."""

from __future__ import annotations

import typer

from maskdit.core.errors import exit_on_user_error

config_app = typer.Typer(help="Inspect training configs and the configuration reference.", no_args_is_help=True)


@config_app.command("show")
def show(
    config: str = typer.Argument(..., help="YAML file or preset name (e.g. mnist_pretrain)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, as for `maskdit train`"),
) -> None:
    """Print a training config with presets resolved, overrides applied and defaults filled in."""
    import yaml

    from maskdit.core.config import load_config
    from maskdit.train.config import TrainConfig, preset_path

    with exit_on_user_error():
        cfg = load_config(TrainConfig, preset_path(config), overrides or [])
    from maskdit.core.storage import redact

    typer.echo(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False).rstrip())


@config_app.command("reference")
def reference() -> None:
    """Print the configuration reference (Markdown) generated from the pydantic models."""
    from maskdit.cli.configref import render_reference

    typer.echo(render_reference().rstrip())

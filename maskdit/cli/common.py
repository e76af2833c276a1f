"""What every step command shares: `--config FILE` plus `key=value` overrides, one config model, one run().

A step command is `maskdit <step> [--config FILE] [key=value ...]`: the YAML file (or the model's
defaults) with the overrides applied, validated as the step's config model (an unknown key is an
error naming it), then `run(config)`. The result is what the step writes as result.json; the
command prints a human summary of it, never something a program has to parse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from maskdit.core.errors import exit_on_user_error

R = TypeVar("R")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with the step's config "
                                                      "(else its defaults); key=value arguments override it.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value settings, e.g. out=eval/ "
                                                          "sampler.cfg_scale=1.5 (nested keys with dots).")]


def run_step(config_cls: type, run: Callable[..., R], config: Path | None, overrides: list[str] | None) -> R:
    """Load the step's config (file + overrides) and run it; a user error becomes one line and exit code 2."""
    from maskdit.core.config import load_config

    with exit_on_user_error():
        return run(load_config(config_cls, config, overrides or []))

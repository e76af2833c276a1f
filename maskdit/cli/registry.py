"""`maskdit register`: an evaluated checkpoint into the MLflow Model Registry."""

from __future__ import annotations

import typer

from maskdit.cli.common import ConfigOption, Overrides, run_step


def register(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Register what an evaluation scored: alias `candidate`; `champion` if its FID is the best.

    Keys: evaluation= (the evaluate step's out folder), name= (required), dataset=, kfp_run_id=, tracking_uri=,
    experiment=, out=.
    """
    from maskdit.registry.register import RegisterConfig, run

    result = run_step(RegisterConfig, run, config, overrides)
    stays = "" if result.champion else f"; champion stays version {result.previous_champion}: {result.reason}"
    typer.echo(f"registered {result.name} version {result.version} (FID {result.fid:.4g}) as "
               f"{', '.join(result.aliases)}{stays}")

"""`maskdit compare`: MaskDiT against the same network unmasked, at equal training wall clock."""

from __future__ import annotations

import logging

import typer

from maskdit.cli.common import ConfigOption, Overrides, run_step


def compare(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Train MaskDiT (masked + unmasking tuning) and plain DiT for the same seconds; FID and accuracy curves.

    Keys: data=, reference= (held-out data), out= (required), budget_s=, eval_points=, tune_share=,
    fid_samples=, train.model.patch_size=2, ... (`maskdit config reference` lists them all).
    """
    from maskdit.compare.command import run, summary
    from maskdit.compare.config import CompareConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_step(CompareConfig, run, config, overrides)
    typer.echo(f"{summary(result)} -> {result.plot}")

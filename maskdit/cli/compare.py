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


def compare_report(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Join the seeds of one comparison: mean curves with min-max bands, a table, who reaches each level first.

    Keys: results=[run-s0,run-s1] (compare.json files or compare's out folders), out= (required),
    fid_levels=, accuracy_levels=, max_load= (`maskdit config reference` lists them all).
    """
    from maskdit.compare.report import CompareReportConfig, run, summary

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_step(CompareReportConfig, run, config, overrides)
    typer.echo(f"{summary(report)} -> {report.plot}, {report.markdown}")

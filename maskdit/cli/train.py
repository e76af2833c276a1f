"""`maskdit train --config X [key=value ...]`: one process, or every rank under torchrun.

The result (final checkpoint, steps, metrics) is `checkpoint.dir/result.json`, written by rank 0.
"""

from __future__ import annotations

import logging
import os

import typer

from maskdit.cli.common import Overrides
from maskdit.core.errors import exit_for_restart_policy
from maskdit.train.config import preset_path


def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML file, or a preset name: imagenet256_pretrain, "
                               "imagenet256_tune_zero, imagenet256_tune_cosine, mnist_pretrain, mnist_tune"),
    overrides: Overrides = None,
) -> None:
    """Masked pretraining or unmasking tuning; resumes from the newest checkpoint in checkpoint.dir."""
    from maskdit.core.config import load_config
    from maskdit.train.config import TrainConfig
    from maskdit.train.loop import run

    main = int(os.environ.get("RANK", 0)) == 0
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_for_restart_policy():
        cfg = load_config(TrainConfig, preset_path(config), overrides or [])
        result = run(cfg)
    if main:
        typer.echo(f"steps {result.step}, skipped {result.skipped_steps}, "
                   + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        typer.echo(f"final checkpoint {result.checkpoint}; result in {cfg.checkpoint.dir}")

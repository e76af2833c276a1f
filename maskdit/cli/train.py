"""`maskdit train --config X [key=value ...]`: one process, or every rank under torchrun.

The result (final checkpoint, steps, metrics) is `checkpoint.dir/result.json`, written by rank 0.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

import typer

from maskdit.cli.common import Overrides
from maskdit.errors import exit_for_restart_policy


def preset_path(config: str) -> Path:
    """A YAML path, or the name of a preset shipped in maskdit/configs (e.g. `mnist_pretrain`)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = resources.files("maskdit") / "configs" / f"{Path(config).stem}.yaml"
    return Path(str(shipped)) if shipped.is_file() else path


def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML file, or a preset name: imagenet256_pretrain, "
                               "imagenet256_tune_zero, imagenet256_tune_cosine, mnist_pretrain, mnist_tune"),
    overrides: Overrides = None,
) -> None:
    """Masked pretraining or unmasking tuning; resumes from the newest checkpoint in checkpoint.dir."""
    from maskdit.config import load_config
    from maskdit.train import run
    from maskdit.trainconfig import TrainConfig

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

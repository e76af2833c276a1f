"""The evaluation area: `maskdit fid-stats`, `maskdit evaluate`, `maskdit sample` (heavy imports inside).

Each runs as one process or under torchrun (`torchrun --nproc-per-node 8 $(which maskdit) evaluate ...`).
"""

from __future__ import annotations

import typer

from maskdit.cli.common import ConfigOption, Overrides, run_step


def fid_stats(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Reference FID statistics (Inception pool3 mean and covariance) of images or a dataset.

    Keys: source=, out=<file>.npz (required), inception=, batch_size=, limit=, features=, device=.
    """
    from maskdit.evaluation.fid import FIDStatsConfig, run

    result = run_step(FIDStatsConfig, run, config, overrides)
    typer.echo(f"{result.n} images -> {result.stats}")


def evaluate(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """FID of generated samples against reference statistics; writes result.json and grid.png to out.

    Keys: checkpoint=, ref_stats=, out= (required), num_samples=, sampler.cfg_scale=, sampler.num_steps=, ...
    """
    from maskdit.evaluation.evaluate import EvaluateConfig, run

    result = run_step(EvaluateConfig, run, config, overrides)
    if result is not None:
        judged = "" if result.accuracy is None else (f", class accuracy {result.accuracy:.1%} by {result.classifier} "
                                                     f"({result.classifier_accuracy:.1%} on held-out real images)")
        typer.echo(f"FID {result.fid:.4g}{judged} ({result.num_samples} samples, CFG {result.sampler.cfg_scale}, "
                   f"{result.sampler.num_steps} steps) -> {result.grid}")


def sample(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Generate images from a checkpoint or a registered model (EDM Heun sampler with CFG).

    Keys: checkpoint= (a checkpoint URI or models:/<name>@<alias>), out= (a .png grid or a folder),
    classes=[1,7], n_per_class=, num_images=, sampler.cfg_scale=, seed=, png=, npz=, ...
    """
    from maskdit.evaluation.sample import SampleConfig, run

    result = run_step(SampleConfig, run, config, overrides)
    if result is not None:
        typer.echo(f"{result.images} images -> {result.out}")

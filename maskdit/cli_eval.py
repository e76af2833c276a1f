"""`maskdit sample`, `maskdit evaluate`, `maskdit fid-stats` (heavy imports inside the functions).

Each runs as one process or under torchrun (`torchrun --nproc-per-node 8 $(which maskdit) evaluate ...`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from maskdit.errors import exit_on_user_error


def _parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        from maskdit.sample import SampleError

        raise SampleError(f"--classes {text!r} must be comma-separated class indices, e.g. 1,7") from None


def sample(
    checkpoint: str = typer.Option(None, "--checkpoint", help="checkpoint file or folder (path or s3:// URI)"),
    model: str = typer.Option(None, "--model", help="registered model, models:/<name>@<alias>"),
    out: str = typer.Option(..., "--out", help="grid PNG (ends in .png: rows of classes, columns of seeds), "
                            "or a folder (path or URI) for <index>.png files and/or samples.npz"),
    classes: str = typer.Option(None, "--classes", help="comma-separated classes, e.g. 1,7 (grid rows)"),
    n_per_class: int = typer.Option(8, "--n-per-class", min=1, help="images per class (grid columns)"),
    n: int = typer.Option(None, "--num-images", min=1, help="N images with uniform random classes (instead of --classes)"),
    cfg_scale: float = typer.Option(1.5, "--cfg-scale", help="classifier-free guidance scale w (1 = none)"),
    steps: int = typer.Option(40, "--steps", min=1, help="EDM Heun steps"),
    seed: int = typer.Option(0, "--seed", help="image i uses seed + i (grid: seed + column)"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per forward pass, per rank"),
    dataset: str = typer.Option(None, "--dataset", help="dataset whose manifest names the decoder "
                                "(default: the checkpoint's train_config.data.uri)"),
    png: bool = typer.Option(True, "--png/--no-png", help="folder output: one PNG per image"),
    npz: bool = typer.Option(False, "--npz/--no-npz", help="folder output: one samples.npz (arr_0 images, arr_1 labels)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Generate images from a checkpoint or a registered model (EDM Heun sampler with CFG)."""
    from maskdit import distributed
    from maskdit.sample import (SampleError, generate, grid_plan, load_sampler_source, random_labels,
                                sample_to, save_grid)

    with exit_on_user_error():
        if (checkpoint is None) == (model is None):
            raise SampleError("give exactly one of --checkpoint URI or --model models:/<name>@<alias>")
        if model is not None and not model.startswith("models:/"):
            raise SampleError(f"--model {model!r} is not a models:/ URI; use --checkpoint for checkpoint files")
        wanted = _parse_classes(classes)
        if wanted and n:
            raise SampleError("give --classes (with --n-per-class) or --num-images (random classes), not both")
        info = distributed.setup(device)
        try:
            source = load_sampler_source(checkpoint or model, info.device, dataset)
            if out.endswith(".png"):
                if info.is_main:
                    rows = wanted or list(range(min(8, source.config.num_classes)))
                    labels, seeds = grid_plan(rows, n_per_class, seed)
                    images = generate(source.precond, source.decode, labels, seeds, cfg_scale, steps, batch_size,
                                      progress=True)  # (R * K, H, W, 3)
                    save_grid(images, len(rows), out)
                    typer.echo(out)
                return
            if n:
                labels = random_labels(n, source.config.num_classes, seed)
                seeds = [seed + i for i in range(n)]
            else:
                labels, seeds = grid_plan(wanted or list(range(source.config.num_classes)), n_per_class, seed)
            sample_to(source, out, labels, seeds, cfg_scale, steps, batch_size, png=png, npz=npz,
                      rank=info.rank, world_size=info.world_size)
            if info.is_main:
                typer.echo(f"{len(seeds)} images -> {out}")
        finally:
            distributed.teardown()


def evaluate(
    config: str = typer.Option(None, "--config", "-c", help="EvalConfig YAML (else defaults + overrides)"),
    overrides: list[str] = typer.Argument(None, help="key=value, e.g. checkpoint=s3://b/run ref_stats=ref.npz "
                                          "out=eval/ num_samples=50000 cfg_scale=1.5"),
) -> None:
    """FID of generated samples against reference statistics; writes summary.json and grid.png to out."""
    from maskdit import distributed
    from maskdit.config import load_config
    from maskdit.evaluate import EvalConfig
    from maskdit.evaluate import evaluate as run_evaluate

    with exit_on_user_error():
        cfg = load_config(EvalConfig, Path(config) if config else None, overrides or [])
        try:
            summary = run_evaluate(cfg)
        finally:
            distributed.teardown()
    if summary is not None:
        typer.echo(json.dumps(summary))  # last line on stdout: pipeline steps parse it


def fid_stats(
    source: str = typer.Option(..., "--source", help="image folder, or dataset URI (folder / s3:// prefix with "
                               "manifest.json; images decoded with its VAE)"),
    out: str = typer.Option(..., "--out", help="statistics .npz (path or URI): mu, sigma as ADM/EDM write them"),
    inception: str = typer.Option("bundled", "--inception", help="weights: bundled, a path, URL or s3:// URI"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    limit: int = typer.Option(None, "--limit", min=2, help="use the first N images only"),
    features: bool = typer.Option(False, "--features/--no-features",
                                  help="also store the raw features (enables precision/recall in evaluate)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Reference FID statistics (Inception pool3 mean and covariance) of images or a dataset."""
    from maskdit import fid
    from maskdit.distributed import resolve_device

    with exit_on_user_error():
        inc = fid.InceptionFeatures(inception, resolve_device(device, int(os.environ.get("LOCAL_RANK", 0))))
        stats = fid.compute_source_stats(source, inc, batch_size, limit, keep_features=features, progress=True)
        fid.save_stats(stats, out)
    typer.echo(f"{stats.n} images -> {out}")

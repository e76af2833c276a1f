"""`maskdit register`, and the entry points of the pipeline layer: `maskdit pipeline ...`, `maskdit demo`.

maskdit/ knows nothing of KFP: `pipeline` and `demo` forward to `pipelines.cli` at call time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskdit.errors import exit_on_user_error

# `maskdit pipeline <anything>` hands its arguments (and --help) to pipelines.cli untouched
FORWARD = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []}, "add_help_option": False}


def register(
    checkpoint: Annotated[str, typer.Option(help="Checkpoint file or folder (newest valid one), local or s3://.")],
    fid: Annotated[float, typer.Option(help="The checkpoint's FID (from `maskdit evaluate`).")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    cfg_scale: Annotated[float, typer.Option(help="CFG scale the FID was measured with (sampling default).")] = 1.5,
    num_steps: Annotated[int, typer.Option(help="Sampler steps the FID was measured with (sampling default).")] = 40,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset the model was trained on (default: the "
                                                        "checkpoint's data.uri); its manifest names the VAE.")] = None,
    kfp_run_id: Annotated[Optional[str], typer.Option(help="Kubeflow run that produced the model (a tag).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (env MLFLOW_TRACKING_URI wins).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the registration run (without a parent).")] = "maskdit",
) -> None:
    """Register a checkpoint in the MLflow Model Registry: alias `candidate`; `champion` if its FID is best.

    Prints a JSON summary as the last line (name, version, champion, aliases, model_uri, ...).
    """
    from maskdit.registry import register as run_register

    with exit_on_user_error():
        result = run_register(checkpoint, fid, name, cfg_scale=cfg_scale, num_steps=num_steps, dataset_uri=dataset,
                              kfp_run_id=kfp_run_id, tracking_uri=tracking_uri, experiment=experiment)
    typer.echo(f"registered {result.name} version {result.version} as {', '.join(result.aliases)}"
               + ("" if result.champion else f" (champion stays version {result.previous_champion}, "
                                              f"FID {result.previous_champion_fid})"), err=True)
    typer.echo(result.to_json())


def pipeline(ctx: typer.Context) -> None:
    """The Kubeflow pipeline: compile | run-local | submit | schedule (`maskdit pipeline --help`)."""
    from pipelines.cli import pipeline_app

    pipeline_app(args=ctx.args, prog_name="maskdit pipeline")


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store, the sqlite MLflow and the samples.")] = Path("demo-output"),
) -> None:
    """The whole pipeline on this machine (CPU, a few minutes): MNIST digits through KFP's local runner."""
    from pipelines.cli import demo as run_demo

    run_demo(out)

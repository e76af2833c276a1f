"""The `maskdit` command: every pipeline step is a plain command.

Each step command is `maskdit <step> [--config FILE] [key=value ...]` over the step's config model
and calls the step's `run(config)` (maskdit/cli/common.py). Commands live in this package by area,
with heavy imports inside the function bodies so that `maskdit --help` stays fast. The pipeline
itself (compile, submit, schedule, the local demo) is the `maskdit-pipeline` command of the
`pipelines` package: maskdit/ knows nothing of KFP.
"""

import typer

from maskdit.cli import compare, config, data, evaluation, registry, tracking, train

app = typer.Typer(
    help="MaskDiT: encode, train, sample, evaluate and register masked diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """MaskDiT pipeline steps as plain commands (each runs without Kubeflow)."""


@app.command()
def version() -> None:
    """Print the installed maskdit version."""
    from maskdit import __version__

    typer.echo(__version__)


app.command("encode")(data.encode)
app.add_typer(data.data_app, name="data")
app.command("train")(train.train)
app.add_typer(config.config_app, name="config")
app.command("fid-stats")(evaluation.fid_stats)
app.command("evaluate")(evaluation.evaluate)
app.command("sample")(evaluation.sample)
app.command("register")(registry.register)
app.command("compare")(compare.compare)
app.command("compare-report")(compare.compare_report)
app.add_typer(tracking.mlflow_user_app, name="mlflow-user")

"""The `maskdit` command: every pipeline step is a plain command.

Each area keeps its commands in `maskdit/cli_<area>.py` with heavy imports inside the
function bodies, so `maskdit --help` stays fast; they are registered below.
"""

import typer

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


# --- commands of each area (registered here, defined in maskdit/cli_<area>.py) ---

from maskdit import cli_data  # noqa: E402  (data: encode, data mnist)

app.command("encode")(cli_data.encode)
app.add_typer(cli_data.data_app, name="data")

from maskdit import cli_train  # noqa: E402  (train)

app.command("train")(cli_train.train)

from maskdit import cli_config  # noqa: E402  (config show / reference)

app.add_typer(cli_config.config_app, name="config")

from maskdit import cli_registry  # noqa: E402  (registry; pipeline and demo forward to pipelines.cli)

app.command("register")(cli_registry.register)
app.command("pipeline", **cli_registry.FORWARD)(cli_registry.pipeline)
app.command("demo")(cli_registry.demo)

from maskdit import cli_eval  # noqa: E402  (evaluation: sample, evaluate, fid-stats)

app.command("sample")(cli_eval.sample)
app.command("evaluate")(cli_eval.evaluate)
app.command("fid-stats")(cli_eval.fid_stats)

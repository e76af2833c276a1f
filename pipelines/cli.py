"""`maskdit-pipeline compile | run-local | submit | schedule | demo`: the DAG and its command.

The pipeline layer has its own command (a console script of the same package): maskdit/ never
imports KFP or this package.
"""

import inspect
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from maskdit.core.errors import UserError, exit_on_user_error
from pipelines.host import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, kfp_client, run_arguments
from pipelines.kfp_auth import TOKEN_ENV, TOKEN_HINT, read_token
from pipelines.kfp_backend import (
    NEWEST_BACKEND,
    OPTIONAL_ENV_SINCE,
    SUPPORTED_BACKENDS,
    check_backend,
    rewrite_for_backend,
)
from pipelines.maskdit_pipeline import PIPELINE_YAML, compile_pipeline, maskdit_pipeline

pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, run locally, submit, schedule; the local demo.",
                           no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)

NamespaceOption = Annotated[Optional[str], typer.Option(
    help="Multi-user Kubeflow: your profile's namespace (e.g. kubeflow-user-example-com), where the run, its "
    "steps and their PyTorchJobs go. Standalone KFP: leave it out.")]
ServiceAccountOption = Annotated[Optional[str], typer.Option(
    help="Service account of the run's step pods (default: KFP's own, pipeline-runner standalone or "
    "default-editor in a profile); k8s/overlays/*/steps/rolebinding.yaml must bind it.")]
ParamOption = Annotated[Optional[list[str]], typer.Option(
    "--param", "-p", help="Pipeline parameter key=value (repeatable); lists/dicts as JSON, e.g. "
    'pretrain_overrides=\'["steps=1000"]\'.')]
TimeoutOption = Annotated[float, typer.Option(
    help="Seconds to wait for each answer of the KFP API (connecting: at most "
    f"{CONNECT_TIMEOUT_S:g} s).", min=0.1)]


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> typed pipeline arguments (types from the pipeline's signature)."""
    signature = inspect.signature(maskdit_pipeline.pipeline_func)
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in signature.parameters:
            known = ", ".join(signature.parameters)
            raise UserError(f"-p {pair!r}: expected key=value with key one of: {known}")
        kind = signature.parameters[key].annotation
        try:
            if kind is str:
                value: Any = text
            elif kind is bool:
                value = {"true": True, "false": False}[text.lower()]
            elif kind in (list, dict):
                value = json.loads(text)
                if not isinstance(value, kind):
                    raise ValueError
            else:
                value = kind(text)
        except (ValueError, KeyError, json.JSONDecodeError):
            raise UserError(f"-p {key}={text!r}: not a valid {kind.__name__}"
                            f"{' (JSON)' if kind in (list, dict) else ''}") from None
        params[key] = value
    return params


@pipeline_app.command("compile")
def compile_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = PIPELINE_YAML,
    image: Annotated[Optional[str], typer.Option(help="Image of the steps (your registry's maskdit image).")] = None,
    kfp_backend: Annotated[str, typer.Option(
        help=f"The KFP backend version that will run it: {', '.join(SUPPORTED_BACKENDS)}. Before "
        f"{OPTIONAL_ENV_SINCE} the Secrets and the ConfigMap are required, with every key.")] = NEWEST_BACKEND,
) -> None:
    """Compile the pipeline to YAML for the KFP UI (Pipelines > Upload pipeline) or the kfp CLI."""
    with exit_on_user_error():
        check_backend(kfp_backend)
        typer.echo(rewrite_for_backend(compile_pipeline(out, image), kfp_backend))


def run_local(arguments: dict[str, Any], pipeline_root: str | Path) -> None:
    """Run the whole DAG with KFP's local runner (subprocesses in this environment, backend local).

    Encode and evaluate run on this machine's CPU unless `step_gpus` says otherwise: as torchrun jobs with
    `local_nproc` processes (`encode_as_job`, `evaluate_as_job`), or in the step's own process.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    maskdit_pipeline(**{"backend": "local", "step_gpus": 0, **arguments})


@pipeline_app.command("run-local")
def run_local_cmd(
    param: ParamOption = None,
    pipeline_root: Annotated[Path, typer.Option(help="Folder for the steps' artifacts.")] = Path("kfp-local"),
) -> None:
    """Run the DAG on this machine with KFP's local runner (torchrun instead of PyTorchJobs)."""
    with exit_on_user_error():
        arguments = parse_params(param)
    run_local(arguments, pipeline_root.resolve())


TokenOption = Annotated[Optional[str], typer.Option(
    envvar=TOKEN_ENV, help=f"Multi-user Kubeflow: a service-account token with audience pipelines.kubeflow.org "
    f"({TOKEN_HINT}); better through ${TOKEN_ENV} than on the command line.")]
TokenFileOption = Annotated[Optional[Path], typer.Option(
    help="A file holding the token instead, e.g. /var/run/secrets/kubeflow/pipelines/token in a notebook pod.")]


@pipeline_app.command("submit")
def submit_cmd(
    host: Annotated[Optional[str], typer.Option(help="KFP API endpoint, e.g. http://localhost:8080 "
                                                     "(kubectl port-forward); default: in-cluster.")] = None,
    namespace: NamespaceOption = None,
    service_account: ServiceAccountOption = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "maskdit",
    run_name: Annotated[Optional[str], typer.Option(help="Run name (default: maskdit-<time>).")] = None,
    package: Annotated[Path, typer.Option(help="Compiled pipeline YAML.")] = PIPELINE_YAML,
    param: ParamOption = None,
    timeout: TimeoutOption = READ_TIMEOUT_S,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
) -> None:
    """Start one run on Kubeflow Pipelines (its parameters are checked here first)."""
    with exit_on_user_error():
        arguments = run_arguments(package, parse_params(param))  # before contacting the host
        bearer = read_token(token, token_file)
        with kfp_client(host, min(CONNECT_TIMEOUT_S, timeout), timeout, token=bearer) as client:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name or f"maskdit-{time.strftime('%Y%m%d-%H%M%S')}",
                experiment_name=experiment, namespace=namespace, service_account=service_account)
    typer.echo(f"run {result.run_id}")


@pipeline_app.command("schedule")
def schedule_cmd(
    cron: Annotated[str, typer.Option(help="KFP cron (6 fields, seconds first), e.g. '0 0 3 * * 0' = Sundays 03:00.")],
    name: Annotated[str, typer.Option(help="Recurring run name.")] = "maskdit-retrain",
    host: Annotated[Optional[str], typer.Option(help="KFP API endpoint; default: in-cluster.")] = None,
    namespace: NamespaceOption = None,
    service_account: ServiceAccountOption = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "maskdit",
    package: Annotated[Path, typer.Option(help="Compiled pipeline YAML.")] = PIPELINE_YAML,
    param: ParamOption = None,
    timeout: TimeoutOption = READ_TIMEOUT_S,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
) -> None:
    """Schedule recurring retrains (one at a time, no catch-up of missed runs; parameters checked here first)."""
    with exit_on_user_error():
        arguments = run_arguments(package, parse_params(param))  # before contacting the host
        bearer = read_token(token, token_file)
        with kfp_client(host, min(CONNECT_TIMEOUT_S, timeout), timeout, token=bearer) as client:
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
            recurring = client.create_recurring_run(experiment_id, name, cron_expression=cron, max_concurrency=1,
                                                    no_catchup=True, params=arguments,
                                                    pipeline_package_path=str(package),
                                                    service_account=service_account)
    typer.echo(f"recurring run {recurring.recurring_run_id}")


# --- `maskdit-pipeline demo` ---

DEMO_MODEL, DEMO_EXPERIMENT = "maskdit-mnist", "maskdit-demo"
# FID reference: the held-out digits (40 a class) that the demo never trains on (maskdit.data.mnist);
# Inception on CPU costs about 0.25 s an image.
DEMO_REF_SPLIT = "heldout"
DEMO_SAMPLES = 200
# A 1.5M-parameter model after about 10 minutes of CPU training: 86 % of its samples are the digit
# asked for at guidance 1.5 (the paper's FID setting for ImageNet), 98.5 % at 4 (docs/benchmarks.md).
DEMO_CFG_SCALE = 4.0
# Training under torchrun with 2 processes of one thread each (DDP over gloo, 32 digits a rank): 5.6 steps/s
# on 2 cores against 4.4 for one process of two threads (docs/benchmarks.md); the same model either way.
DEMO_NPROC = min(2, os.cpu_count() or 1)


def _reference_stats(out: Path, limit: int | None = None) -> Path:
    """FID statistics of the held-out real digits (never trained on; `limit` of them), computed once."""
    from maskdit.data.mnist import write_mnist
    from maskdit.evaluation import fid

    stats = out / "ref_stats_heldout.npz"
    if not stats.exists():
        digits = out / "ref-digits-heldout"
        write_mnist(digits, limit=limit, split=DEMO_REF_SPLIT)
        fid.run(fid.FIDStatsConfig(source=str(digits), out=str(stats)))
    return stats


def _floor_fid(out: Path, ref_stats: Path, n: int) -> float:
    """The FID real digits get: `n` training digits (balanced over the classes) against the same held-out
    reference, through the same Inception and statistics as the samples' FID. The demo's FID is read
    against it (no model can be expected below it at that sample count); computed once."""
    from maskdit.data.mnist import write_mnist
    from maskdit.evaluation import fid

    stats = out / f"floor_stats_train{n}.npz"
    if not stats.exists():
        digits = out / f"floor-digits-train{n}"
        write_mnist(digits, limit=n, split="train")
        fid.run(fid.FIDStatsConfig(source=str(digits), out=str(stats)))
    return fid.fid_from_stats(fid.load_stats(str(stats)), fid.load_stats(str(ref_stats)))


@pipeline_app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the store, the sqlite MLflow and the samples.")]
    = Path("demo-output"),
    fid_threshold: Annotated[float, typer.Option(help="Register only when FID <= this.")] = 1000.0,
) -> None:
    """The whole pipeline on this machine: MNIST digits, pixel space, local store and sqlite MLflow."""
    import mlflow

    from maskdit.evaluation import fid

    started = time.time()
    out = out_dir.resolve()
    store, artifacts = out / "store", out / "mlartifacts"
    for folder in (store, artifacts):
        folder.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    mlflow.set_tracking_uri(tracking)
    if mlflow.get_experiment_by_name(DEMO_EXPERIMENT) is None:
        mlflow.create_experiment(DEMO_EXPERIMENT, artifact_location=artifacts.as_uri())
    from maskdit.core.errors import exit_on_user_error

    with exit_on_user_error():  # e.g. the demo extra missing: one line, not a traceback
        ref_stats = _reference_stats(out)
        floor = _floor_fid(out, ref_stats, DEMO_SAMPLES)
    run_local(dict(images="mnist", store_uri=str(store), resolution=32, pixel_space=True, grayscale=True,
                   pretrain_config="mnist_pretrain", tune_config="mnist_tune", local_nproc=DEMO_NPROC,
                   ref_stats=str(ref_stats), num_samples=DEMO_SAMPLES,
                   sampler={"cfg_scale": DEMO_CFG_SCALE, "num_steps": 18},
                   fid_threshold=fid_threshold, model_name=DEMO_MODEL, experiment=DEMO_EXPERIMENT,
                   encode_as_job=False, evaluate_as_job=False), out / "kfp")  # small data: in the steps themselves
    grid = _grid_png(store, out / "samples.png")
    ref_n = fid.load_stats(str(ref_stats)).n
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(DEMO_MODEL, "candidate")
    parent = client.get_run(version.run_id).data.tags.get("mlflow.parentRunId", version.run_id)
    typer.echo(f"""
demo finished in {(time.time() - started) / 60:.1f} min
  sample grid : {grid}   (rows: digits 0-9, columns: seeds)
  FID         : {float(version.tags['fid']):.2f} ({DEMO_SAMPLES} samples at CFG {DEMO_CFG_SCALE} against the {ref_n} held-out real digits)
  FID floor   : {floor:.2f} ({DEMO_SAMPLES} real training digits against the same {ref_n}: what a model that drew the data itself would score)
  accuracy    : {_accuracy_line(store)}
  MLflow run  : {parent} (experiment {DEMO_EXPERIMENT})
  registered  : models:/{DEMO_MODEL}/{version.version} (aliases: {', '.join(sorted(version.aliases))})
  sample it   : .venv/bin/maskdit sample checkpoint=models:/{DEMO_MODEL}@champion classes=[0,1,2,3,4,5,6,7,8,9] \\
                    sampler.cfg_scale={DEMO_CFG_SCALE} out=grid.png   (with MLFLOW_TRACKING_URI={tracking})
  MLflow UI   : .venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000   (then open http://127.0.0.1:5000)""")


def _newest_evaluation(store: Path):
    from maskdit.core.result import read_result
    from maskdit.evaluation.evaluate import EvaluateResult

    found = sorted(store.glob("runs/*/evaluate/result.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no evaluation under {store / 'runs'}: did the evaluate step run?")
    return read_result(EvaluateResult, str(found[-1]))


def _accuracy_line(store: Path) -> str:
    result = _newest_evaluation(store)
    if result.accuracy is None:
        return "- (no reference classifier)"
    return (f"{result.accuracy:.1%} of the samples classified as the digit asked for ({result.classifier}, "
            f"{result.classifier_accuracy:.1%} on held-out real digits)")


def _grid_png(store: Path, dest: Path) -> Path:
    """The sample grid of the newest run's evaluation (its result.json names it), copied to `dest`."""
    from maskdit.core import storage

    dest.write_bytes(storage.get_bytes(_newest_evaluation(store).grid))
    return dest

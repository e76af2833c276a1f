"""What the KFP components run: each step is a `maskdit` command plus the bookkeeping around it.

The component functions (components/<step>.py) only forward their inputs here, so the logic is
plain Python that tests import directly. A step's artifacts are small pointers: the data and the
checkpoints stay in object storage (`store_uri`), and each artifact records the URI in its
metadata (`uri`) and in its file (JSON), so KFP never copies gigabytes between steps.
"""

from __future__ import annotations

import base64
import collections
import html
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

S3_SECRET = "maskdit-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
MLFLOW_SECRET = "maskdit-mlflow"  # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD (may be empty)
CONFIG_MAP = "maskdit-config"  # MLFLOW_TRACKING_URI (k8s/base/kustomization.yaml)
KFP_RUN_TAG = "kfp.run_id"


class StepError(RuntimeError):
    """A `maskdit` command that a step runs failed."""


def maskdit_exe() -> str:
    """The `maskdit` entry point of this interpreter's environment (a venv need not be on PATH)."""
    sibling = Path(sys.executable).parent / "maskdit"
    return str(sibling) if sibling.exists() else "maskdit"


def sh(args: list[str], env: dict[str, str] | None = None, tail: int = 40) -> str:
    """Run `maskdit <args>`, streaming its output; return its stdout. Raise StepError with the tail."""
    cmd = [maskdit_exe(), *args]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if proc.wait() != 0:
        last = "\n".join(collections.deque(lines, maxlen=tail))
        raise StepError(f"`maskdit {args[0]}` failed with exit code {proc.returncode}:\n{last}")
    return "\n".join(lines)


def last_json(output: str) -> dict:
    """The last line of `output` that is a JSON object (the summary a command prints)."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StepError(f"expected a JSON summary line in the command's output; got:\n{output[-2000:]}")


# --- artifacts as pointers ---

def point(artifact, uri: str, **metadata) -> None:
    """Make `artifact` point at `uri` (metadata + a small JSON file at artifact.path)."""
    artifact.metadata.update({"uri": uri, **metadata})
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri, **metadata}, indent=1))


def pointed(artifact) -> str:
    """The URI an upstream step's artifact points at."""
    uri = artifact.metadata.get("uri")
    if not uri and Path(artifact.path).exists():
        uri = json.loads(Path(artifact.path).read_text()).get("uri")
    if not uri:
        raise StepError(f"artifact {artifact.name!r} at {artifact.path} carries no 'uri': was it written by maskdit?")
    return uri


def run_dir(store_uri: str, kfp_run_id: str) -> str:
    from components.launcher import label_value

    return f"{store_uri.rstrip('/')}/runs/{label_value(kfp_run_id)}"


# --- MLflow: one parent run per pipeline run ---

def parent_run(kfp_run_id: str, kfp_run_name: str, experiment: str) -> str | None:
    """The MLflow parent run of this pipeline run (found by its `kfp.run_id` tag, else created).

    None when no tracking URI is configured (MLFLOW_TRACKING_URI). Steps pass the id to their
    command as MASKDIT_PARENT_RUN_ID, which nests the step's own run under it.
    """
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=kfp_run_name or f"kfp-{kfp_run_id}",
                            tags={KFP_RUN_TAG: kfp_run_id, "kfp.run_name": kfp_run_name, "maskdit.pipeline": "true"})
    return run.info.run_id


def finish_parent_run(kfp_run_id: str, experiment: str, state: str, error: str = "") -> None:
    """Close the pipeline run's MLflow parent run: FINISHED when KFP says SUCCEEDED, else FAILED."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'") if exp else []
    for run in found:
        client.set_tag(run.info.run_id, "kfp.state", state)
        if error:
            client.set_tag(run.info.run_id, "kfp.error", error[:5000])
        client.set_terminated(run.info.run_id, "FINISHED" if state == "SUCCEEDED" else "FAILED")
        print(f"MLflow parent run {run.info.run_id}: {state}")


def step_env(kfp_run_id: str, kfp_run_name: str, experiment: str) -> dict[str, str]:
    """Environment for a step's command: nest its MLflow run under the pipeline run's parent run."""
    parent = parent_run(kfp_run_id, kfp_run_name, experiment)
    return {"MASKDIT_PARENT_RUN_ID": parent} if parent else {}


# --- the steps ---

def encode_step(images: str, store_uri: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool,
                dataset) -> str:
    """`maskdit encode` into `<store>/datasets/<name>-<resolution>[-pixel]`; 'mnist' = the bundled digits."""
    name = "mnist" if images == "mnist" else Path(images.rstrip("/")).name
    out = f"{store_uri.rstrip('/')}/datasets/{name}-{resolution}{'-pixel' if pixel_space else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        source = images
        if images == "mnist":
            source = str(Path(tmp) / "mnist")
            sh(["data", "mnist", "--out", source])
        args = ["encode", "--input", source, "--out", out, "--resolution", str(resolution)]
        args += ["--pixel-space"] if pixel_space else ["--vae", vae]
        args += ["--grayscale"] if grayscale else []
        sh(args)
    point(dataset, out, manifest=f"{out}/manifest.json", source=images, resolution=resolution)
    return out


def train_step(step: str, config: str, overrides: list[str], dataset_uri: str, init_from: str, store_uri: str,
               kfp_run_id: str, kfp_run_name: str, experiment: str, image: str, backend: str, nodes: int,
               gpus_per_node: int, cpu: str, memory: str, shm_size: str, node_selector: dict, tolerations: list,
               namespace: str, timeout_hours: float, local_nproc: int) -> tuple[str, str]:
    """`maskdit train` as a PyTorchJob (or torchrun here); return (final checkpoint URI, MLflow parent run)."""
    from components.launcher import TrainJob, launch, last_line

    ckpt_dir = f"{run_dir(store_uri, kfp_run_id)}/{step}"
    command = ["maskdit", "train", "--config", config, f"data.uri={dataset_uri}", f"checkpoint.dir={ckpt_dir}"]
    command += [f"init_from={init_from}"] if init_from else []
    command += list(overrides)
    env = step_env(kfp_run_id, kfp_run_name, experiment)
    job = TrainJob(step=step, run_id=kfp_run_id, image=image, command=command, checkpoint_uri=ckpt_dir, nodes=nodes,
                   gpus_per_node=gpus_per_node, cpu=cpu, memory=memory, shm_size=shm_size,
                   node_selector=dict(node_selector), tolerations=list(tolerations), env=env,
                   secrets=[S3_SECRET, MLFLOW_SECRET], config_maps=[CONFIG_MAP])
    log = launch(job, backend, namespace=namespace or None, timeout_s=timeout_hours * 3600, local_nproc=local_nproc)
    return last_line(log), env.get("MASKDIT_PARENT_RUN_ID", "")


def grid_html(png: bytes, title: str, rows: dict[str, object]) -> str:
    """A self-contained HTML page: a table of `rows` and the sample grid embedded as base64 PNG."""
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    data = base64.b64encode(png).decode()
    return (f"<html><body><h2>{html.escape(title)}</h2><table>{table}</table>"
            f'<img alt="samples" style="image-rendering: pixelated; width: 100%; max-width: 768px" '
            f'src="data:image/png;base64,{data}"/></body></html>')


def cleanup_step(kfp_run_id: str, backend: str, namespace: str) -> list[str]:
    """Delete the run's PyTorchJobs (kubernetes backend); the local backend leaves nothing behind."""
    if backend != "kubernetes":
        print(f"backend {backend!r}: no PyTorchJobs to clean up")
        return []
    from components.launcher import delete_run_jobs, training_client

    deleted = delete_run_jobs(kfp_run_id, training_client(namespace or None))
    print(f"deleted PyTorchJobs of run {kfp_run_id}: {deleted or 'none'}")
    return deleted


def evaluate_step(checkpoint_uri: str, dataset_uri: str, ref_stats: str, num_samples: int, cfg_scale: float,
                  num_steps: int, kfp_run_id: str, kfp_run_name: str, experiment: str, metrics, samples) -> float:
    """`maskdit evaluate` (FID + sample grid); log both to KFP. Empty `ref_stats` = the whole dataset's own."""
    env = step_env(kfp_run_id, kfp_run_name, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        if not ref_stats:
            ref_stats = str(Path(tmp) / "ref_stats.npz")
            sh(["fid-stats", "--source", dataset_uri, "--out", ref_stats], env)
        summary = last_json(sh(["evaluate", f"checkpoint={checkpoint_uri}", f"dataset={dataset_uri}",
                                f"ref_stats={ref_stats}", f"out={tmp}/eval", f"num_samples={num_samples}",
                                f"cfg_scale={cfg_scale}", f"num_steps={num_steps}"], env))
        fid = float(summary["fid"])
        png = (Path(tmp) / "eval" / "grid.png").read_bytes()
    for key, value in (("fid", fid), ("cfg_scale", cfg_scale), ("num_steps", num_steps), ("num_samples", num_samples),
                       *((k, summary[k]) for k in ("precision", "recall") if k in summary)):
        metrics.log_metric(key, float(value))
    Path(samples.path).parent.mkdir(parents=True, exist_ok=True)
    Path(samples.path).write_text(grid_html(png, "MaskDiT samples", {
        "FID": f"{fid:.3f}", "samples": num_samples, "CFG scale": cfg_scale, "sampler steps": num_steps,
        "reference": summary.get("ref_stats", ref_stats), "checkpoint": checkpoint_uri,
        "MLflow parent run": env.get("MASKDIT_PARENT_RUN_ID", "-")}))
    return fid


def register_step(checkpoint_uri: str, dataset_uri: str, fid: float, cfg_scale: float, num_steps: int,
                  model_name: str, kfp_run_id: str, kfp_run_name: str, experiment: str, report) -> tuple[str, bool]:
    """`maskdit register`: a new version (alias candidate), champion when it beats the current one."""
    env = step_env(kfp_run_id, kfp_run_name, experiment)
    summary = last_json(sh(["register", "--checkpoint", checkpoint_uri, "--fid", repr(float(fid)),
                            "--name", model_name, "--cfg-scale", repr(float(cfg_scale)), "--num-steps", str(num_steps),
                            "--dataset", dataset_uri, "--kfp-run-id", kfp_run_id], env))
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(
        f"## {summary['name']} version {summary['version']}\n\n"
        f"| | |\n|---|---|\n| FID | {fid:.3f} |\n| aliases | {', '.join(summary['aliases'])} |\n"
        f"| champion before | {summary.get('previous_champion') or '-'} "
        f"(FID {summary.get('previous_champion_fid') or '-'}) |\n"
        f"| model URI | `{summary['model_uri']}` |\n| MLflow run | `{summary['run_id']}` |\n")
    return str(summary["version"]), bool(summary["champion"])

"""Issue 23.4: a model larger than the MLflow server's spool registers and warm-starts.

MLflow's artifact proxy (mlflow/server/artifact_router.py under uvicorn) writes a proxied upload
(`PUT /mlflow-artifacts/artifacts/...`) whole into a temporary folder before it hands it to the
S3 store, and a proxied download (`GET`) whole from S3 into one before it streams it out: in the
cluster that folder is the server's /tmp, an emptyDir the kubelet evicts the pod for overfilling.
The multipart transfers (`/mlflow-artifacts/mpu/*` and `/mlflow-artifacts/presigned/*`) move the
bytes between the client and the store through URLs the server presigns, so the server writes none.

Here the server runs as deployed (k8s/base/mlflow.yaml's arguments, basic auth) with its artifacts
on SeaweedFS, and every file it writes is capped below the weights (RLIMIT_FSIZE; Python ignores
SIGXFSZ, so a write past the cap fails with EFBIG, as a full /tmp fails its writes). The clients
run with the settings `maskdit-config` ships (k8s/components/settings); the 500 MB threshold above
which MLflow uploads by multipart is scaled down with the cap. With multipart on, `maskdit register`
and the warm start from `models:/<name>@champion` move the weights; with either direction turned
off the same transfer fails in the spool, and the user reads one line (exit 143: a server error).
"""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.mlflow_deployed import K8S, DeployedMlflow
from typer.testing import CliRunner

from maskdit.core.errors import EXIT_RETRYABLE, ServiceUnavailable

pytestmark = pytest.mark.slow  # a real MLflow server and SeaweedFS

SPOOL_LIMIT = 16 * 2**20  # bytes any file the server writes may reach (production: the 8 GiB /tmp)
MULTIPART_FROM = 8 * 2**20  # MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE (production: MLflow's 500 MB)
# the server's command, run under a cap on the size of every file it writes
_CAPPED = ("import os, resource, sys; limit = int(sys.argv[1]); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execvp(sys.argv[2], sys.argv[2:])")


def shipped_settings() -> dict[str, str]:
    """The MLFLOW_* transfer settings of the ConfigMap maskdit-config (every pod's environment)."""
    kustomization = yaml.safe_load((K8S / "components" / "settings" / "kustomization.yaml").read_text())
    [config] = [c for c in kustomization["configMapGenerator"] if c["name"] == "maskdit-config"]
    literals = dict(literal.split("=", 1) for literal in config["literals"])
    return {k: v for k, v in literals.items() if k.startswith("MLFLOW_") and "MULTIPART" in k}


class SpoolCappedMlflow(DeployedMlflow):
    """The deployed MLflow with its artifacts in `artifacts` (s3://) on `s3`, every file it writes capped."""

    def __init__(self, root: Path, artifacts: str, s3, limit: int):
        super().__init__(root)
        self.artifacts, self.s3, self.limit = artifacts, s3, limit

    def command(self) -> list[str]:
        argv = [a if not a.startswith("--artifacts-destination=") else f"--artifacts-destination={self.artifacts}"
                for a in super().command()]
        return [sys.executable, "-c", _CAPPED, str(self.limit), *argv]

    def env(self) -> dict[str, str]:
        (self.root / "tmp").mkdir(exist_ok=True)
        return {**super().env(), **self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                "TMPDIR": str(self.root / "tmp")}


@pytest.fixture(scope="module")
def capped(s3_server, tmp_path_factory):
    bucket = f"spool-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    server = SpoolCappedMlflow(tmp_path_factory.mktemp("mlflow-spool"), f"s3://{bucket}/mlflow", s3_server,
                               SPOOL_LIMIT)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client_env(capped, monkeypatch):
    """A pod's MLflow environment: the server, its account, the shipped transfer settings (threshold scaled)."""
    for key, value in {**capped.client_env(), **shipped_settings(),
                       "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(MULTIPART_FROM)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASKDIT_PARENT_RUN_ID", raising=False)
    return capped


def big_checkpoint(root: Path) -> tuple[str, str, dict]:
    """An untrained pixel-space model whose registered bf16 weights (about 36 MiB) pass the server's cap twice:
    (checkpoint URI, dataset folder with its manifest, the EMA state dict)."""
    from maskdit.data.shards import Manifest, write_manifest
    from maskdit.method.checkpoint import save_checkpoint
    from maskdit.method.model import MaskDiT, model_config

    cfg = model_config("tiny", in_channels=1, hidden_size=320, depth=10, num_heads=4)
    write_manifest(str(root / "dataset"), Manifest(
        space="pixel", count=0, images=0, channels=1, resolution=cfg.input_size,
        shape=(1, cfg.input_size, cfg.input_size), dtype="uint8", scale_factor=1.0,
        class_names=[str(i) for i in range(cfg.num_classes)], shard_size=1, shards=[]))
    torch.manual_seed(0)
    weights = MaskDiT(cfg).state_dict()
    ckpt = save_checkpoint(str(root / "ckpt"), {"model_config": cfg.model_dump(), "model": weights, "ema": weights,
                                                "optimizer": None, "step": 3,
                                                "train_config": {"data": {"uri": str(root / "dataset")}}})
    return ckpt, str(root / "dataset"), weights


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return big_checkpoint(tmp_path_factory.mktemp("big"))


def _error_line(text: str, start: str) -> str:
    """The one line of a command's output that starts with `start` (MLflow prints its own lines around it)."""
    assert "Traceback" not in text, text
    [line] = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_the_shipped_settings_turn_on_multipart_both_ways():
    assert shipped_settings() == {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
                                  "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "true"}


def test_a_model_larger_than_the_spool_registers_and_warm_starts(client_env, big):
    import mlflow

    from maskdit.registry.register import register
    from maskdit.train.warmstart import resolve

    ckpt, dataset, ema = big
    name = "spool-big"
    registered = register(ckpt, 10.0, name, dataset_uri=dataset)
    assert registered.champion
    files = {f.path: f.file_size
             for f in mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{name}/{registered.version}/artifacts")}
    weights = [size for path, size in files.items() if path.endswith(".safetensors")]
    assert weights and weights[0] > 2 * SPOOL_LIMIT > weights[0] / 2, files  # larger than the cap, not absurdly

    source, state = resolve(f"models:/{name}@champion", client_env.uri)  # the warm start's path
    assert source.resolved == f"models:/{name}/{registered.version}"  # the file's sha256 was checked on the way
    for key, value in ema.items():
        assert torch.equal(state["ema"][key], value.to(torch.bfloat16).float()), key
    assert "File too large" not in client_env.log()  # nothing reached the cap


def test_without_multipart_the_spool_refuses_the_weights_in_one_line(client_env, big, tmp_path, monkeypatch):
    """The same transfers with either direction's multipart turned off: the server's spool overflows,
    `maskdit register` / the warm start say so in one line and exit 143 (a server error: retried)."""
    from maskdit.cli import app
    from maskdit.evaluation.evaluate import EvaluateResult
    from maskdit.evaluation.inception import BUNDLED_SHA256
    from maskdit.method.diffusion import SamplerConfig
    from maskdit.registry.register import register
    from maskdit.train.warmstart import resolve

    ckpt, dataset, _ = big
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: minutes of backoff
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    EvaluateResult(fid=10.0, num_samples=100, sampler=SamplerConfig(num_steps=5), seed=0, checkpoint=ckpt, step=3,
                   dataset=dataset, ref_stats="s3://b/ref.npz", ref_stats_sha256="a" * 64, ref_n=50,
                   inception="bundled", inception_sha256=BUNDLED_SHA256, world_size=1, seconds=1.0,
                   grid=str(tmp_path / "grid.png")).write(str(tmp_path / "evaluate" / "result.json"))
    result = CliRunner().invoke(app, ["register", f"evaluation={tmp_path / 'evaluate'}", "name=spool-refused"])
    line = _error_line(result.output, "registering spool-refused: ")
    assert result.exit_code == EXIT_RETRYABLE, (result.output, result.exception)
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD" in line and "/tmp" in line, line
    assert "File too large" in client_env.log()  # the cap refused the spooled upload

    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    name = "spool-download"
    register(ckpt, 10.0, name, dataset_uri=dataset)
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    with pytest.raises(ServiceUnavailable) as error:
        resolve(f"models:/{name}@champion", client_env.uri)
    line = str(error.value)
    assert "\n" not in line
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" in line and "/tmp" in line, line
    assert re.search(r"ema\.safetensors|weights", line), line
    assert not [p for p in (client_env.root / "tmp").iterdir() if p.is_dir()]  # each failure's spool was removed

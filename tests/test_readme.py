"""Every command the README shows must exist with the options it uses.

The commands that need a cluster (kubectl, docker, a KFP server) cannot run here: for them the
test checks what can be checked offline - the folders and files they name, and the kfp and
mlflow CLIs' own option tables. The `maskdit` commands run end to end in `make demo` and in the
step tests; here each one is resolved through the real CLI, its options checked, and its
`key=value` overrides validated against the config model they feed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPERATING = ROOT / "docs" / "operating.md"  # the install guide: its shell blocks are checked the same way


def readme_commands(text: str | None = None) -> list[list[str]]:
    text = README.read_text() + OPERATING.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _click_command(root, words: list[str]) -> tuple[object, list[str]]:
    """Walk sub-commands of `root` along `words`; return the leaf and the remaining words."""
    command, rest = root, list(words)
    while hasattr(command, "get_command") and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"README uses {words!r}: no sub-command {rest[0]!r} of {command.name!r}"
        command, rest = sub, rest[1:]
    return command, rest


def _check_options(command, rest: list[str], what: str) -> list[str]:
    """Every --flag in `rest` is an option of `command`; returns the positional words."""
    known = {opt for param in command.params for opt in (*param.opts, *getattr(param, "secondary_opts", []))}
    positional = []
    skip = False
    for word in rest:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            flag = word.split("=")[0]
            assert flag in known, f"README: {what} has no option {flag} (it has {sorted(known)})"
            param = next(p for p in command.params if flag in (*p.opts, *getattr(p, "secondary_opts", [])))
            skip = "=" not in word and not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        else:
            positional.append(word)
    return positional


def _step_configs() -> dict[str, type]:
    """The config model behind each step command (`maskdit <step> key=value ...`)."""
    from maskdit.data.encode import EncodeConfig
    from maskdit.evaluation.evaluate import EvaluateConfig
    from maskdit.evaluation.fid import FIDStatsConfig
    from maskdit.evaluation.sample import SampleConfig
    from maskdit.registry.register import RegisterConfig

    return {"encode": EncodeConfig, "fid-stats": FIDStatsConfig, "evaluate": EvaluateConfig, "sample": SampleConfig,
            "register": RegisterConfig}


def _maskdit(words: list[str]) -> None:
    from maskdit.cli import app

    command, rest = _click_command(typer.main.get_command(app), words)
    positional = _check_options(command, rest, "maskdit " + " ".join(words[:2]))
    overrides = [w for w in positional if "=" in w]
    if words[0] == "train":
        from maskdit.core.config import load_config
        from maskdit.train.config import TrainConfig, preset_path

        config = words[words.index("--config") + 1]
        load_config(TrainConfig, preset_path(config), overrides)
    elif words[0] in _step_configs():
        from maskdit.core.config import load_config

        load_config(_step_configs()[words[0]], None, overrides)
    elif words[:2] == ["config", "show"]:
        from maskdit.train.config import preset_path

        assert preset_path(positional[0]).is_file(), f"README names a preset that does not exist: {positional[0]}"


def _maskdit_pipeline(words: list[str]) -> None:
    from pipelines.cli import parse_params, pipeline_app

    command, rest = _click_command(typer.main.get_command(pipeline_app), words)
    _check_options(command, rest, "maskdit-pipeline " + words[0])
    params = [rest[i + 1] for i, w in enumerate(rest) if w in ("--param", "-p")]
    parse_params(params)  # names and types as the pipeline declares them


def check(words: list[str]) -> None:
    tool = words[0]
    if tool == "maskdit":
        _maskdit(words[1:])
    elif tool == "maskdit-pipeline":
        _maskdit_pipeline(words[1:])
    elif tool == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "maskdit.cli"
        _maskdit(words[words.index("-m") + 2:])
    elif tool == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, f"README: make {words[1]} is not a Makefile target"
    elif tool == "kfp":
        from kfp.cli.cli import cli

        start = 3 if words[1] == "--endpoint" else 1
        command, rest = _click_command(cli, words[start:])
        _check_options(command, rest, "kfp " + " ".join(words[start:start + 2]))
        for flag in ("--package-file", "--pipeline-package-path"):
            if flag in words:
                assert (ROOT / words[words.index(flag) + 1]).is_file()
    elif tool == "mlflow":
        from mlflow.cli import cli

        command, rest = _click_command(cli, words[1:])
        _check_options(command, rest, "mlflow " + words[1])
    elif tool == "kubectl":
        if "-k" in words:
            folder = ROOT / words[words.index("-k") + 1]
            assert (folder / "kustomization.yaml").is_file(), f"README applies {folder}, which is no kustomization"
    elif tool == "cp":
        assert (ROOT / words[1]).is_file(), f"README copies {words[1]}, which does not exist"
    elif tool == "docker":
        assert words[1] in ("push", "build")
    elif tool == ".venv/bin/pytest":
        assert (ROOT / words[1]).is_file()
    elif tool == "curl":
        _check_invocation(words)
    elif tool == "export":  # the KFP token for multi-user Kubeflow: the variable submit|schedule read
        from pipelines.kfp_auth import TOKEN_ENV

        assert words[1].split("=", 1)[0] == TOKEN_ENV, f"docs export {words[1]}, which nothing reads"
    elif tool == "aws":
        assert words[1:3] == ["s3", "cp"], f"docs run aws {' '.join(words[1:3])}"
    else:
        pytest.fail(f"README shows a command this test does not know how to check: {' '.join(words)}")


def _check_invocation(words: list[str]) -> None:
    """A request to `mlflow models serve`: JSON that MLflow parses into a frame the model's signature takes."""
    from mlflow.models.utils import validate_schema
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    from maskdit.registry.pyfunc import SIGNATURE

    assert words[words.index("-H") + 1] == "Content-Type: application/json"
    assert next(w for w in words if w.startswith("http")).endswith("/invocations")
    frame = infer_and_parse_data(json.loads(words[words.index("-d") + 1]), SIGNATURE.inputs)
    validate_schema(frame, SIGNATURE.inputs)


def readme_curl_body() -> str:
    """The request body of the README's `curl` to a served model (tests/test_model_env.py sends its form)."""
    (words,) = [w for w in readme_commands(README.read_text()) if w[0] == "curl"]
    return words[words.index("-d") + 1]


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:60])
def test_readme_command(words):
    check(words)


def test_quick_start_is_two_make_commands():
    first = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", first, flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]


def test_readme_pipeline_parameters_exist():
    import inspect

    from pipelines.maskdit_pipeline import maskdit_pipeline

    names = set(inspect.signature(maskdit_pipeline.pipeline_func).parameters)
    section = README.read_text().split("## Run from the KFP UI", 1)[1].split("##", 1)[0]
    for cell in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M):
        for name in re.findall(r"`(\w+)`", cell):
            assert name in names, f"README names pipeline parameter {name!r}, which the DAG does not have"


# --------------------------------------------------------------------------------------------
# kfp commands against the compiled pipeline, as the backend checks them
# --------------------------------------------------------------------------------------------

DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# KFP's runtime parameters are protobuf Values: what each declared parameterType accepts
PARAMETER_TYPES = {"STRING": (str,), "NUMBER_INTEGER": (int, float), "NUMBER_DOUBLE": (int, float),
                   "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}


def kfp_commands() -> list[list[str]]:
    """Every `kfp ...` command in the README and docs/*.md."""
    return [words for path in DOCS for words in readme_commands(path.read_text()) if words[0] == "kfp"]


class _Submitted(Exception):
    """What the kfp CLI would send to the API: raised by the recording client instead of a request."""

    def __init__(self, call: dict):
        super().__init__("submitted")
        self.call = call


class _RecordingClient:
    """Stands in for `kfp.Client` under the kfp CLI: records the run it would create."""

    def __init__(self, *args, **kwargs):
        pass

    def create_experiment(self, name, *args, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(experiment_id=f"id-of-{name}")

    def run_pipeline(self, **kwargs):
        raise _Submitted(kwargs)

    def create_recurring_run(self, *args, **kwargs):
        raise _Submitted(kwargs)


def kfp_submission(words: list[str], monkeypatch) -> dict | None:
    """The kfp CLI's own parsing of a `run create` / `recurring-run create` command: the API call's arguments
    (params: the runtime parameters as the CLI types them); None for other kfp commands."""
    import kfp.client
    from click.testing import CliRunner
    from kfp.cli.cli import cli

    start = 3 if words[1] == "--endpoint" else 1
    if words[start + 1:start + 2] != ["create"] or words[start] not in ("run", "recurring-run"):
        return None
    monkeypatch.setattr(kfp.client, "Client", _RecordingClient)
    monkeypatch.chdir(ROOT)  # package paths are relative to the repository
    result = CliRunner().invoke(cli, words[1:], obj={})
    assert isinstance(result.exception, _Submitted), f"kfp {' '.join(words[1:])} failed: {result.output}"
    return result.exception.call


def check_parameters(params: dict, package: Path) -> None:
    """Names and types of runtime parameters against the compiled pipeline's root inputDefinitions."""
    import yaml

    spec = next(yaml.safe_load_all(package.read_text()))
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for name, value in params.items():
        assert name in declared, f"{package.name} has no parameter {name!r} (it has {sorted(declared)})"
        kind = declared[name]["parameterType"]
        ok = isinstance(value, PARAMETER_TYPES[kind]) and (kind == "BOOLEAN" or not isinstance(value, bool))
        if ok and kind == "NUMBER_INTEGER":
            ok = float(value).is_integer()
        assert ok, (f"{name}={value!r} ({type(value).__name__}) is not a {kind}, the type {package.name} "
                    "declares: the backend rejects the run")
    missing = [n for n, d in declared.items() if not d.get("isOptional") and "defaultValue" not in d
               and n not in params]
    assert not missing, f"{package.name} needs parameters {missing}"


def _package(call: dict) -> Path:
    return ROOT / call["pipeline_package_path"]


@pytest.mark.parametrize("words", kfp_commands(), ids=lambda w: " ".join(w)[:70])
def test_kfp_command_parameters_match_the_compiled_pipeline(words, monkeypatch):
    check(words)  # sub-commands and options
    call = kfp_submission(words, monkeypatch)
    if call is not None:
        check_parameters(call["params"] or {}, _package(call))


def test_kfp_check_rejects_what_the_backend_rejects(monkeypatch):
    """`kfp recurring-run create` sends every key=value as a string; `kfp run create` parses JSON."""
    base = ["kfp", "--endpoint", "http://localhost:8080"]
    recurring = base + ["recurring-run", "create", "--experiment-name", "e", "--job-name", "j", "--cron-expression",
                        "0 0 3 * * 0", "--pipeline-package-path", "pipelines/maskdit_pipeline.yaml"]
    call = kfp_submission(recurring + ["fid_threshold=3.0"], monkeypatch)
    assert call["params"] == {"fid_threshold": "3.0"} and call["max_concurrency"] == 1 and call["no_catchup"]
    with pytest.raises(AssertionError, match="fid_threshold='3.0' .* is not a NUMBER_DOUBLE"):
        check_parameters(call["params"], _package(call))
    check_parameters(kfp_submission(recurring + ["model_name=m"], monkeypatch)["params"], _package(call))
    assert not kfp_submission(recurring + ["--catchup"], monkeypatch)["no_catchup"]

    run = base + ["run", "create", "--experiment-name", "e", "--package-file", "pipelines/maskdit_pipeline.yaml"]
    call = kfp_submission(run + ["fid_threshold=3", "num_samples=100", "grayscale=true",
                                 'pretrain_overrides=["steps=1"]'], monkeypatch)
    assert call["params"] == {"fid_threshold": 3, "num_samples": 100, "grayscale": True,
                              "pretrain_overrides": ["steps=1"]}
    check_parameters(call["params"], _package(call))
    for bad, match in (("num_samples=1.5", "not a NUMBER_INTEGER"), ("grayscale=1", "not a BOOLEAN"),
                       ("model_name=7", "not a STRING"), ("fid_treshold=3", "no parameter 'fid_treshold'")):
        with pytest.raises(AssertionError, match=match):
            check_parameters(kfp_submission(run + [bad], monkeypatch)["params"], _package(call))

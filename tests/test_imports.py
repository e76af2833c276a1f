"""The layers of docs/design.md, checked on the source: who may import whom, and no import cycles.

Every import counts, also those inside function bodies (the CLI keeps heavy imports there): a
cycle through a lazy import is still a cycle, it only fails later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maskdit", "components", "pipelines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Modules (of any package) that the file imports, resolved to the deepest known project module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports(path, known) if m in known and m != name} for name, path in mods.items()}


def external(name: str) -> set[str]:
    return {m.split(".")[0] for m in imports(modules()[name], set(modules()))}


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.split(".")[0] == "maskdit"))
def test_the_method_knows_nothing_of_kfp_kubernetes_or_the_pipeline(name):
    assert not external(name) & {"kfp", "kubernetes", "kubeflow", "components", "pipelines"}, name


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.split(".")[0] == "components"))
def test_components_know_nothing_of_the_dag(name):
    assert "pipelines" not in external(name), name


# Inside maskdit/, packages by concern form a ladder: a module imports only from its own rung or below.
LADDER = ("core", "method", "data", "evaluation", "train", "registry", "compare", "elastic", "cli")


def rung(module: str) -> int:
    """The ladder position of a maskdit module; `maskdit` itself (the version) sits under every rung."""
    parts = module.split(".")
    return -1 if parts == ["maskdit"] else LADDER.index(parts[1])


def test_every_maskdit_module_sits_on_a_rung_of_the_ladder():
    strays = [m for m in modules() if m.startswith("maskdit.") and m.split(".")[1] not in LADDER]
    assert strays == [], f"modules outside the ladder's packages {LADDER}: {strays}"


def test_no_import_runs_back_up_the_ladder():
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() if a.startswith("maskdit")
                    for b in deps if b.startswith("maskdit") and rung(b) > rung(a))
    assert upward == [], "imports that run up the ladder " + " < ".join(LADDER) + ":\n" + "\n".join(upward)


MAX_LINES = 400  # one concern a module: past this, a file is usually two


@pytest.mark.parametrize("package", ["maskdit", "components", "pipelines"])
def test_no_module_is_over_400_lines(package):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_top_of_maskdit_shows_the_method_not_the_wiring():
    assert not list((ROOT / "maskdit").glob("cli_*.py")), "command modules belong in maskdit/cli/"
    assert (ROOT / "maskdit" / "cli" / "__init__.py").is_file()


def test_every_step_is_run_config_to_result():
    """encode, fid-stats, train, evaluate, register, sample: `run(<Step>Config) -> <Step>Result`."""
    import inspect
    import typing

    from maskdit.core.result import StepResult
    from maskdit.data import encode
    from maskdit.evaluation import evaluate, fid, sample
    from maskdit.registry import register as registry
    from maskdit.train import loop as train

    for module, config, result in ((encode, "EncodeConfig", "EncodeResult"), (fid, "FIDStatsConfig", "FIDStatsResult"),
                                   (train, "TrainConfig", "TrainResult"),
                                   (evaluate, "EvaluateConfig", "EvaluateResult"),
                                   (registry, "RegisterConfig", "RegisterResult"),
                                   (sample, "SampleConfig", "SampleResult")):
        hints = typing.get_type_hints(module.run)
        first = next(iter(inspect.signature(module.run).parameters))
        assert hints[first].__name__ == config, module.__name__
        returned = [a for a in typing.get_args(hints["return"]) or [hints["return"]] if a is not type(None)]
        assert [a.__name__ for a in returned] == [result] and issubclass(returned[0], StepResult), module.__name__

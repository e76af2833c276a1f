"""Write docker/constraints.txt: the versions of everything `pip install .` brings in, as
installed in this environment (the one the tests ran in).

    .venv/bin/python docker/pin.py

tests/test_docker.py uses `runtime_closure` to check that the file names every runtime
dependency. Local version labels (torch's +cpu) are dropped: the image installs a CUDA build.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The dependency versions the image installs: the ones the tests ran with (Linux, Python 3.11).
# Written by `.venv/bin/python docker/pin.py`; tests/test_docker.py checks it is complete.
"""


def runtime_closure(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{canonical name: installed version} of the project's dependencies (pyproject.toml's
    list, not the dev extra) and of theirs, as installed here."""
    found: dict[str, str] = {}
    todo = [Requirement(text) for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{req.name} is not installed here: pip install -e '.[dev]' first") from None
        found[key[0]] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            if not dep.marker or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(dep)
    return found


def main() -> None:
    pins = [f"{name}=={version.split('+')[0]}" for name, version in sorted(runtime_closure().items())]
    path = Path(__file__).with_name("constraints.txt")
    path.write_text(HEADER + "\n".join(pins) + "\n")
    print(f"{path}: {len(pins)} pins")


if __name__ == "__main__":
    main()

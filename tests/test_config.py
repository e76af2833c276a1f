import pytest

from maskdit.core.config import ConfigError, StrictModel, flatten, load_config, parse_overrides


class Inner(StrictModel):
    depth: int = 28
    lr: float = 1e-4


class Outer(StrictModel):
    name: str = "x"
    inner: Inner = Inner()


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  depth: 4\n")
    cfg = load_config(Outer, path, ["inner.lr=2e-3"])
    assert cfg.name == "run" and cfg.inner.depth == 4 and cfg.inner.lr == pytest.approx(2e-3)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  dpeth: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'inner.dpeth'"):
        load_config(Outer, path)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"inner.depth.*'many'"):
        load_config(Outer, None, ["inner.depth=many"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["depth"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_flatten():
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}

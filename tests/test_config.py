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


# --- values mean what they say (YAML 1.2, typed overrides, bounded errors) ---

def test_a_string_override_is_the_text_as_typed():
    from maskdit.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["data.uri=s3://bucket/set #3", "checkpoint.dir=/runs/a b #c",
                                          "init_from=~", "steps=12", "optim.lr=1e-4", "checkpoint.resume_from="])
    assert cfg.data.uri == "s3://bucket/set #3" and cfg.checkpoint.dir == "/runs/a b #c"
    assert cfg.init_from == "~" and cfg.checkpoint.resume_from is None  # empty = unset
    assert cfg.steps == 12 and cfg.optim.lr == pytest.approx(1e-4)


def test_yaml_1_1_surprises_are_refused_or_read_as_yaml_1_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: no\ninner:\n  lr: 1e-3\n")  # YAML 1.1: False and the string "1e-3"
    cfg = load_config(Outer, path)
    assert cfg.name == "no" and cfg.inner.lr == pytest.approx(1e-3)
    path.write_text("inner:\n  depth: 010\n")  # YAML 1.1: 8
    with pytest.raises(ConfigError, match=r"'010' is ambiguous .*write it without the leading zero"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match=r"override inner.depth: '010' is ambiguous"):
        load_config(Outer, None, ["inner.depth=010"])
    assert load_config(Outer, None, ["inner.depth=0o10", "name=yes"]).inner.depth == 8


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  depth: 4\nname: a\ninner:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"key 'inner' is given twice \(lines 1 and 4\)"):
        load_config(Outer, path)


def test_options_are_not_overrides():
    from typer.testing import CliRunner

    from maskdit.cli import app

    for item in ("--config=other.yaml", "--help", "-c"):
        with pytest.raises(ConfigError, match="starts with '-'"):
            parse_overrides([item])
    result = CliRunner().invoke(app, ["config", "show", "mnist_pretrain", "--", "--config=other.yaml"])
    assert result.exit_code == 2 and "starts with '-'" in result.output


def test_an_anchor_bomb_gives_a_short_error(tmp_path):
    """475 bytes of YAML anchors expand to 9**7 strings: the error quotes a bounded excerpt."""
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\ninner:\n  depth: *g\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load_config(Outer, path)
    assert len(str(error.value)) < 2000 and "inner.depth" in str(error.value)
    assert time.monotonic() - started < 5


def test_seconds_from_the_environment_keep_their_bounds_and_name_the_variable(monkeypatch):
    """MASKDIT_RETRY_BUDGET_S takes 0 (no retries) and inf (retry forever); a poll interval needs a finite > 0."""
    from maskdit.core.config import env_seconds
    from maskdit.core.errors import UsageError

    for text, value in (("", 300.0), (" ", 300.0), ("0", 0.0), ("inf", float("inf")), ("2.5", 2.5)):
        monkeypatch.setenv("X_S", text)
        assert env_seconds("X_S", 300.0, example=300, zero_ok=True, infinite_ok=True) == value
    for text in ("-1", "nan", "x"):
        monkeypatch.setenv("X_S", text)
        with pytest.raises(UsageError, match=rf"X_S='{text}' is not a number of seconds >= 0; set it to e.g. 300"):
            env_seconds("X_S", 300.0, example=300, zero_ok=True, infinite_ok=True)
    for text in ("0", "inf", "nan", "x"):
        monkeypatch.setenv("X_S", text)
        with pytest.raises(UsageError, match=rf"X_S='{text}' is not a number of seconds > 0; set it to e.g. 15,"):
            env_seconds("X_S", 15.0, example=15)

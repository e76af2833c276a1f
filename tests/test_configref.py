from pathlib import Path

import yaml
from typer.testing import CliRunner

from maskdit.cli import app
from maskdit.cli.configref import render_reference
from maskdit.method.model import ModelConfig
from maskdit.train.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_reference_doc_is_current():
    assert DOC.read_text().rstrip() == render_reference().rstrip(), (
        "docs/configuration.md is stale: run `maskdit config reference > docs/configuration.md`"
    )


def test_reference_names_every_key():
    text = render_reference()
    for name in ModelConfig.model_fields:
        assert f"`model.{name}`" in text
    for name in ("mask.schedule", "checkpoint.dir", "optim.lr", "batch.global_batch", "mae_weight"):
        assert f"`{name}`" in text
    assert "lambda of eq. (8)" in text  # descriptions come from the code


def test_config_show_resolves_preset_and_overrides():
    result = CliRunner().invoke(app, ["config", "show", "mnist_tune", "steps=7"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["steps"] == 7
    TrainConfig.model_validate(shown)  # what it prints is itself a valid config


def test_config_show_names_a_mistyped_key():
    result = CliRunner().invoke(app, ["config", "show", "mnist_tune", "optim.learning_rate=1"])
    assert result.exit_code == 2
    assert "unknown key 'optim.learning_rate'" in result.output

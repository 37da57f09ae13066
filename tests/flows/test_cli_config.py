"""``diffusion-pipeline config`` prints the resolved config without credentials, and every
command's --help reads well at any terminal width. Fast: no stage runs."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config


def invoke(*args: str, columns: int = 100):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def test_config_prints_the_defaults_as_yaml_that_config_reads_back(tmp_path):
    result = invoke("config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == load_config().to_json_dict()
    f = tmp_path / "printed.yaml"
    f.write_text(result.output)
    assert load_config(f) == load_config()


def test_config_applies_file_then_sets_then_root(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  name: pets\n  resolution: 16\ntrain:\n  steps: 5\n")
    result = invoke("config", "--config", str(f), "--set", "train.steps=7", "--set",
                    "model.dropout=0.2", "--root", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == load_config(f, ["train.steps=7", "model.dropout=0.2"],
                                str(tmp_path / "out")).to_json_dict()
    assert (shown["data"]["name"], shown["data"]["resolution"]) == ("pets", 16)
    assert shown["train"]["steps"] == 7 and shown["model"]["dropout"] == 0.2
    assert shown["runtime"]["root"] == str(tmp_path / "out")


def test_config_never_prints_credentials():
    result = invoke("config", "--root", "s3://AKIAEXAMPLE:wJalrSECRET@bucket/prefix",
                    "--set", "runtime.mlflow_uri=https://alice:mlflow-pass@mlflow.example:5000",
                    "--set", "runtime.s3_endpoint_url=http://minio:minio-pass@minio:9000",
                    "--set", "data.source=https://bob:token123@data.example/digits.parquet",
                    "--set", "generate.model=models:/digits-diffusion@champion")
    assert result.exit_code == 0, result.output
    for secret in ("AKIAEXAMPLE", "wJalrSECRET", "alice", "mlflow-pass", "minio-pass", "bob",
                   "token123"):
        assert secret not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["runtime"]["root"] == "s3://bucket/prefix"
    assert shown["runtime"]["mlflow_uri"] == "https://mlflow.example:5000"
    assert shown["runtime"]["s3_endpoint_url"] == "http://minio:9000"
    assert shown["data"]["source"] == "https://data.example/digits.parquet"
    assert shown["generate"]["model"] == "models:/digits-diffusion@champion"


def test_config_with_an_unknown_key_suggests_one_and_lists_its_section_only():
    result = invoke("config", "--set", "train.stpes=3")
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error: invalid config: unknown config key 'train.stpes'; did you "
                           "mean 'train.steps'? (valid keys: train: steps, batch_size, ")
    assert "data:" not in line and "resolution" not in line and len(line.splitlines()) == 1


COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands if not c.hidden]


def _words(text: str) -> str:
    """The text alone: no panel borders, one space between words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _paragraphs(command: str) -> list[str]:
    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    return [_words(p) for p in info.callback.__doc__.split("\n\n")]


def test_the_commands_stay():
    assert {"run", "preprocess", "train", "evaluate", "register", "promote", "rollback",
            "generate", "demo", "config"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_not_hard_wrapped(command):
    """On a wide terminal each paragraph of a command's help is one line: the line breaks of
    the docstring in the source do not reach the terminal."""
    wide = invoke(command, "--help", columns=400)
    assert wide.exit_code == 0, wide.output
    lines = [_words(line) for line in wide.output.splitlines()]
    for paragraph in _paragraphs(command):
        assert paragraph in lines, (paragraph, wide.output)
    listing = [_words(line) for line in invoke("--help", columns=400).output.splitlines()]
    assert f"{command} {_paragraphs(command)[0]}" in listing  # the command list: one line too


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_the_terminal_and_says_everything(command, columns):
    result = invoke(*([command] if command else []), "--help", columns=columns)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= columns
    text = _words(result.output)
    for paragraph in _paragraphs(command) if command else []:
        assert paragraph in text
    for opt in ("--config", "--set", "--root", "--debug") if command not in (None, "demo") else []:
        assert opt in text


@pytest.mark.parametrize("item", ["registry.thresholds.fd=nan", "runtime.stage_timeouts.train=1e12",
                                  "train.lr=inf"])
def test_a_value_that_would_disable_a_check_is_one_error_line_naming_the_key(item):
    result = invoke("config", "--set", item)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and item.split("=")[0] in lines[0], result.output

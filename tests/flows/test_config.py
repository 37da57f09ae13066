"""The pipeline config: defaults → YAML → --set → --root, and errors that name the key."""

from __future__ import annotations

import pytest

from flows.config import PipelineConfig, load_config
from tasks.errors import ConfigError


def test_defaults_are_the_embedded_digits():
    cfg = load_config()
    assert cfg.data.source == "digits" and cfg.data.resolution == 8 and cfg.data.channels == 1
    assert cfg.runtime.root == "./pipeline-data"


def test_yaml_then_sets_then_root(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  name: pets\n  source: s3://b/pets\n  channels: 3\n"
                 "runtime:\n  root: s3://b/out\n")
    cfg = load_config(f, ["data.resolution=32", "data.strict=true", "data.label_column=null"],
                      root="/tmp/x")
    assert (cfg.data.name, cfg.data.source, cfg.data.channels) == ("pets", "s3://b/pets", 3)
    assert cfg.data.resolution == 32 and cfg.data.strict is True and cfg.data.label_column is None
    assert cfg.runtime.root == "/tmp/x"


def test_json_round_trip_is_identity():
    cfg = load_config(sets=["data.val_fraction=0.25"])
    again = PipelineConfig.model_validate(cfg.to_json_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert load_config().fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["data.nope=1"], "unknown config key 'data.nope'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["data.resolution=-3"], "data.resolution"),
        (["data.channels=2"], "data.channels"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["data.name=../up"], "data.name"),
        (["data.resolution"], "expected section.key=value"),
        (["resolution=3"], "must be section.key"),
    ],
)
def test_errors_name_the_key(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(sets=sets)
    assert message in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: data: name, source"):
        load_config(sets=["data.sourec=x"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)

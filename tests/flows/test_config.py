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
        (["data.val_fraction=0.9"], "data.test_fraction (0.15) must be below 1"),
        (["data.test_fraction=-0.1"], "data.test_fraction"),
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


@pytest.mark.parametrize(
    "sets, suggestion, section",
    [
        (["train.stpes=3"], "did you mean 'train.steps'?", "train"),
        (["data.sourec=x"], "did you mean 'data.source'?", "data"),
        (["runtime.mlflow=x"], "did you mean 'runtime.mlflow_uri'?", "runtime"),
        (["model.chanels=3"], "did you mean 'model.in_channels'?", "model"),  # a dataclass
        (["data.steps=3"], "did you mean 'train.steps' or 'generate.steps'?", "data"),
    ],
)
def test_an_unknown_key_gets_did_you_mean_and_the_keys_of_its_section_only(sets, suggestion,
                                                                            section):
    with pytest.raises(ConfigError) as e:
        load_config(sets=sets)
    msg = str(e.value)
    assert f"unknown config key {sets[0].split('=')[0]!r}; {suggestion}" in msg
    listed = msg.split("(valid keys: ", 1)[1]
    assert listed.startswith(f"{section}: ") and listed.count(": ") == 1
    keys = listed.removeprefix(f"{section}: ").removesuffix(")").split(", ")
    assert keys == list(load_config().to_json_dict()[section])


def test_an_unknown_key_without_a_close_match_lists_its_section():
    with pytest.raises(ConfigError) as e:
        load_config(sets=["data.zzz=1"])
    assert "did you mean" not in str(e.value)
    assert "unknown config key 'data.zzz' (valid keys: data: name, source," in str(e.value)


def test_an_unknown_section_lists_the_sections(tmp_path):
    sections = ", ".join(PipelineConfig.model_fields)
    with pytest.raises(ConfigError) as e:
        load_config(sets=["dat.name=x"])
    assert str(e.value) == ("invalid config: unknown config key 'dat': not a section; did you "
                            f"mean 'data'? (sections: {sections})")
    f = tmp_path / "c.yaml"
    f.write_text("steps: 100\n")  # a key at the top level: the section it belongs to
    with pytest.raises(ConfigError, match=r"'steps': not a section; did you mean 'train.steps'"):
        load_config(f)


def _numeric_keys() -> list[str]:
    """Every key of the pipeline config that holds a number (optional ones included), found
    from the sections' own field types, so a key added later is covered too."""
    import dataclasses
    import typing

    def fields(cls) -> dict:
        if hasattr(cls, "model_fields"):
            return {k: f.annotation for k, f in cls.model_fields.items()}
        if dataclasses.is_dataclass(cls):
            return typing.get_type_hints(cls)
        return {}

    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for k, t in fields(cls).items():
            if fields(t):
                walk(t, f"{prefix}{k}.")
            elif any(a in (int, float) for a in (typing.get_args(t) or (t,))):
                out.append(prefix + k)

    walk(PipelineConfig, "")
    return out


NUMERIC_KEYS = _numeric_keys()


def test_the_numeric_keys_are_all_found():
    assert len(NUMERIC_KEYS) > 60
    assert {"train.lr", "runtime.stage_timeouts.train", "model.dropout", "diffusion.min_snr_gamma",
            "registry.lock_wait_s", "generate.labels"} <= set(NUMERIC_KEYS)


def _refused(item: str, key: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(sets=[item])
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("key", [*NUMERIC_KEYS, "registry.thresholds.fd"])
@pytest.mark.parametrize("bad", ["nan", ".nan", "inf", ".inf", "-.inf", "-inf"])
def test_no_numeric_key_takes_nan_or_infinity(key, bad):
    """NaN passes every comparison-based check (``v > nan`` is False, so a NaN threshold
    passes every model) and infinity passes ``> 0``: refused at load, in one line naming the
    key, for every number in the config."""
    _refused(f"{key}={bad}", key)


@pytest.mark.parametrize(("item", "key"), [
    # timeouts: Python's setitimer overflows past 2**63 ns (~292 years); the config stops at a year
    ("runtime.stage_timeouts.train=1e12", "runtime.stage_timeouts.train"),
    ("runtime.stage_timeouts.preprocess=31536001", "runtime.stage_timeouts.preprocess"),
    ("runtime.stage_timeouts.evaluate=0", "runtime.stage_timeouts.evaluate"),
    ("runtime.stage_timeouts.generate=-1", "runtime.stage_timeouts.generate"),
    ("runtime.ray_jobs_unreachable_s=1e12", "runtime.ray_jobs_unreachable_s"),
    ("runtime.storage_connect_timeout=1e12", "runtime.storage_connect_timeout"),
    ("registry.lock_wait_s=1e12", "registry.lock_wait_s"),
    ("registry.lock_stale_s=1e12", "registry.lock_stale_s"),
    # seeds: torch takes 64 bits at most (train.seed is also multiplied by 7919)
    ("train.seed=-1", "train.seed"),
    ("evaluate.seed=-1", "evaluate.seed"),
    ("train.seed=18446744073709551616", "train.seed"),
    ("generate.seed=18446744073709551616", "generate.seed"),
    # a distance in [0, 1]
    ("evaluate.memorization_threshold=1.5", "evaluate.memorization_threshold"),
    # negative counts
    ("train.steps=-1", "train.steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("evaluate.nll_images=-1", "evaluate.nll_images"),
    ("evaluate.bootstrap_draws=-1", "evaluate.bootstrap_draws"),
    ("generate.num_samples=0", "generate.num_samples"),
    ("train.max_failures=-1", "train.max_failures"),
    ("runtime.ray_jobs_resubmits=-1", "runtime.ray_jobs_resubmits"),
    ("data.max_classes=0", "data.max_classes"),
    ("data.max_classes=1000001", "data.max_classes"),
    ("generate.labels=[1, .nan]", "generate.labels"),
    ("generate.labels=[1, -1]", "generate.labels"),
])
def test_out_of_range_values_are_refused_naming_the_key(item, key):
    _refused(item, key)


def test_the_longest_stage_timeout_is_one_setitimer_takes():
    import signal

    from tasks.bounds import MAX_SECONDS

    top = load_config(sets=[f"runtime.stage_timeouts.{s}={MAX_SECONDS}"
                            for s in ("preprocess", "train", "evaluate", "generate")])
    assert top.runtime.stage_timeouts.train == MAX_SECONDS
    if hasattr(signal, "setitimer"):
        old = signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
        signal.setitimer(signal.ITIMER_REAL, *old)


def test_one_mlflow_request_must_fit_the_registry_fences_margin():
    """A registry write follows its lease check at once and must end within lock_stale_s / 2
    (issue 25 item 4): a lease that may be broken sooner than one MLflow request with its
    retries can take is refused, naming the three keys."""
    from tasks.registry import RegistryConfig

    default = RegistryConfig()
    assert default.worst_request_s() == 4 * 2 * 10 + (2 + 4) + 1.5  # 87.5 s < 300 s
    msg = _refused("registry.lock_stale_s=120", "registry.lock_stale_s")
    assert "registry.retries" in msg and "registry.timeout_s" in msg and "175" in msg
    load_config(sets=["registry.lock_stale_s=120", "registry.retries=1", "registry.timeout_s=5"])

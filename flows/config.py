"""The pipeline config: one pydantic model with a section per stage.

Sources, later ones winning: the defaults → a YAML file (``--config``) → ``--set
section.key=value`` overrides → ``--root``. The resolved config travels as JSON at every hop
(CLI → flow parameter → task argument → Ray worker). Each section is defined next to what it
configures (``tasks.datasets.DataConfig``, ``tasks.runtime.RuntimeConfig``); this module only
assembles them. Unknown sections or keys are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffusion.pipeline import DiffusionConfig
from diffusion.unet import UNetConfig
from tasks.datasets import DataConfig
from tasks.digits import DIGITS_DIFFUSION, DIGITS_UNET
from tasks.errors import ConfigError
from tasks.evaluate import EvalConfig
from tasks.generate import GenerateConfig
from tasks.registry import RegistryConfig
from tasks.runtime import RuntimeConfig
from tasks.train import TrainConfig


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = Field(default_factory=DataConfig)
    model: UNetConfig = Field(default_factory=lambda: DIGITS_UNET)
    diffusion: DiffusionConfig = Field(default_factory=lambda: DIGITS_DIFFUSION)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the config (for lineage tags)."""
        return hashlib.sha256(
            json.dumps(self.to_json_dict(), sort_keys=True).encode()
        ).hexdigest()


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. data.resolution=32")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _merge(base: dict, key: list[str], value: Any) -> None:
    node = base
    for k in key[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(key)}: {k} is a value, not a section")
        node = child
    node[key[-1]] = value


def _deep_merge(into: dict, new: dict) -> None:
    """Overlay ``new`` on ``into``: sections merge key by key, values replace."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _fields(cls: Any) -> dict[str, Any]:
    """A config section's keys and their types: a pydantic model's or a dataclass's fields."""
    import dataclasses

    if hasattr(cls, "model_fields"):
        return {k: f.annotation for k, f in cls.model_fields.items()}
    if dataclasses.is_dataclass(cls):
        return {f.name: f.type for f in dataclasses.fields(cls)}
    return {}


def _unknown_key(loc: tuple) -> str:
    """An unknown key: the closest valid one ("did you mean"), and the keys of its own section
    (for an unknown section, the sections)."""
    import difflib

    *where, name = (str(p) for p in loc)
    cls: Any = PipelineConfig
    for part in where:
        cls = _fields(cls).get(part)
    valid = list(_fields(cls))
    key = ".".join([*where, name])
    close = [".".join([*where, k]) for k in difflib.get_close_matches(name, valid, n=1)]
    if not close:  # the right key in another section, e.g. data.steps → train.steps
        close = [f"{s}.{name}" for s, f in PipelineConfig.model_fields.items()
                 if name in _fields(f.annotation)]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if not where:
        return f"unknown config key {key!r}: not a section{hint} (sections: {', '.join(valid)})"
    return f"unknown config key {key!r}{hint} (valid keys: {'.'.join(where)}: {', '.join(valid)})"


def load_config(
    path: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    root: str | None = None,
    base: dict | None = None,
) -> PipelineConfig:
    """Build the config from a YAML file, ``section.key=value`` overrides and a root."""
    raw: dict = PipelineConfig().to_json_dict()
    if base:
        _deep_merge(raw, base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, e.g. 'data:'")
        _deep_merge(raw, loaded)
    for item in sets:
        key, value = _parse_set(item)
        _merge(raw, key, value)
    if root is not None:
        _merge(raw, ["runtime", "root"], root)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def with_overrides(config: PipelineConfig | dict, overrides: list[str] | None) -> PipelineConfig:
    """``config`` with ``section.key=value`` overrides applied (the CLI's ``--set`` syntax).

    This is what a deployment run should change: Prefect merges run-time parameters with a
    deployment's by top-level name, so ``--param config=...`` would replace the deployment's
    whole config, while ``--param overrides='["train.steps=1000"]'`` changes one key of it."""
    cfg = PipelineConfig.model_validate(config)
    if not overrides:
        return cfg
    return load_config(sets=list(overrides), base=cfg.to_json_dict())


def _explain(e: ValidationError) -> str:
    msgs = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        # pydantic models say extra_forbidden, dataclasses (model.*) unexpected_keyword_argument
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msgs.append(_unknown_key(err["loc"]))
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            msgs.append(f"{key}: {err['msg']}{got_s}")
    return "invalid config: " + "; ".join(msgs)

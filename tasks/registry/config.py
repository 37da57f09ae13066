"""The ``registry`` config section and the registry's names: aliases, tags, metric directions."""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.bounds import SECTION, Seconds

CHALLENGER, CHAMPION = "challenger", "champion"
WEIGHTS_TAG = "weights_sha256"
CONFIG_TAG = "config_sha256"  # of config.json as registered (versions since it was recorded)
SERVING_FILE = "serving.json"  # a version's digests and sampling defaults, beside its weights
EVAL_KEY_TAG = "eval.key"
HISTORY_TAG = "champion.history"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Metrics the gate may use and their direction (True: lower is better).
LOWER_IS_BETTER: dict[str, bool] = {"fd": True, "nll_bpd": True, "memorization": True}
# Metrics whose difference between two evaluations the gate can bootstrap paired
# (tasks.registry.gate.paired_difference): registry.metric must be one.
PAIRED_METRICS = ("fd", "nll_bpd")
# registry.max_fd_over_floor's default: on the digits (benchmarks/gate_floor.py) the default
# recipe's fd at the floor's size is 0.32-0.41 × its floor, a 50-step model's 4.5 ×, an
# untrained one's 21 ×
MAX_FD_OVER_FLOOR = 2.0


def _known_metric(name: str) -> str:
    if name not in LOWER_IS_BETTER:
        raise ValueError(f"metric {name!r} is unknown; use one of {', '.join(LOWER_IS_BETTER)}")
    return name


class RegistryConfig(BaseModel):
    """The ``registry`` section of the pipeline config."""

    model_config = SECTION

    model_name: str | None = Field(
        None, description="Registered model name (default: '<data.name>-diffusion').")
    metric: str = Field("fd", description="Metric the promotion gate compares.")
    margin: float = Field(
        0.0, ge=0, lt=1, description="Relative improvement required, e.g. 0.02 = 2% better: "
        "the bound of the paired interval of the difference must clear it, so 0 still asks "
        "for a difference beyond the noise.")
    interval_level: float = Field(
        0.95, gt=0, lt=1, description="Confidence of the paired interval of the challenger's "
        "difference to the champion: its bound must clear the margin.")
    bootstrap_draws: int = Field(
        2000, ge=100, description="Paired bootstrap resamples behind that interval.")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Absolute gates every candidate must pass (metric → bound), beside "
        "registry.max_fd_over_floor; with it they alone decide the first promotion.")
    max_fd_over_floor: float | None = Field(
        MAX_FD_OVER_FLOOR, gt=0, description="Every candidate, the first champion included, "
        "must have fd_matched (its FD on as many samples as the floor holds real images) <= "
        "this × its evaluation's fd_floor (held-out real images against the same val split: "
        "what real data scores); a version without eval.fd_floor is refused. Digits, default "
        "evaluation (benchmarks/gate_floor.py): the default recipe 0.32-0.41, a 50-step model "
        "4.5, an untrained one 21. null: off (then only registry.thresholds gate the first "
        "champion).")
    retries: int = Field(3, ge=0, le=10, description="MLflow HTTP retries per request.")
    timeout_s: float = Field(10, gt=0, le=600, description="MLflow HTTP timeout per request.")
    lock_stale_s: Seconds = Field(
        600, description="A promotion lease not refreshed for this long is broken.")
    lock_wait_s: Seconds = Field(
        120, description="How long a promotion waits for another one to finish.")
    serving_max_rows: int = Field(
        1024, ge=1, le=1_000_000,
        description="Images the served model makes per request, at most (recorded in the "
        "version's serving.json at registration); a larger request is refused.")

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError(f"registry.model_name {v!r}: use letters, digits, '.', '_', '-'")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if _known_metric(v) not in PAIRED_METRICS:
            raise ValueError(f"registry.metric {v} cannot be compared paired (the gate compares "
                             f"a challenger with the champion on {' or '.join(PAIRED_METRICS)}); "
                             f"gate on it with registry.thresholds instead")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            _known_metric(k)
        return v

    def worst_request_s(self) -> float:
        """The longest one MLflow request may take under these bounds (as
        :func:`tasks.registry.session._http_bounds` sets them): each of ``retries + 1`` attempts
        its connect and its read timeout, and urllib3's backoff between attempts (factor 1:
        0, 2, 4... seconds, plus at most 0.5 s of jitter each)."""
        timeout = max(1, math.ceil(self.timeout_s))
        backoff = (2 ** self.retries - 2 if self.retries else 0) + 0.5 * self.retries
        return (self.retries + 1) * 2 * timeout + backoff

    @model_validator(mode="after")
    def _writes_fit_the_fence(self) -> RegistryConfig:
        """A registry write follows its lease check at once and must end within the fence's
        margin, ``lock_stale_s / 2`` (:mod:`tasks.lease`): one MLflow request, retries
        included, must fit in it."""
        worst = self.worst_request_s()
        if worst > self.lock_stale_s / 2:
            raise ValueError(
                f"registry.lock_stale_s={self.lock_stale_s:g} leaves a registry write "
                f"{self.lock_stale_s / 2:g} s after its lease check, but one MLflow request may "
                f"take {worst:g} s (registry.retries={self.retries}, registry.timeout_s="
                f"{self.timeout_s:g}); raise registry.lock_stale_s to at least {2 * worst:g} "
                "or lower registry.retries or registry.timeout_s")
        return self


def model_name_for(cfg: RegistryConfig, dataset_name: str) -> str:
    return cfg.model_name or f"{dataset_name}-diffusion"


def default_lock_dir(root_url: str) -> str:
    """Where promotion leases live under a storage root; all promoters of a model must share it."""
    return root_url.rstrip("/") + "/registry/locks"


def _tag_value(x: float) -> str:
    return repr(float(x))

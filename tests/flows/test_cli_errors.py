"""The CLI maps error types to one line and an exit code: 2 for a config it cannot build, 1 for
any other pipeline error, the type and a --debug hint for an unexpected one. Fast: the stage's
flow is replaced by a function that raises (no Prefect, no Ray)."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from diffusion.serialization import WeightsIntegrityError
from flows import cli
from tasks import errors
from tasks.errors import (
    ConfigError,
    EvalError,
    PipelineError,
    StorageUnavailable,
    TrackingUnavailable,
    TrainingBusy,
)

PIPELINE_ERRORS = sorted(
    (obj for obj in vars(errors).values()
     if isinstance(obj, type) and issubclass(obj, PipelineError)), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", PIPELINE_ERRORS, ids=lambda c: c.__name__)
def test_every_pipeline_error_has_an_exit_code(cls):
    assert cli.exit_code(cls("x")) == (2 if issubclass(cls, ConfigError) else 1)


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("bug"), RuntimeError("bug"),
                                 OSError("disk"), ConnectionError("refused")])
def test_other_errors_are_unexpected(exc):
    assert cli.exit_code(exc) is None


def test_tampered_weights_are_an_expected_error():
    assert cli.exit_code(WeightsIntegrityError("sha256 mismatch")) == 1


@pytest.fixture
def stage_raises(monkeypatch):
    """``stage_raises(exc)``: the ``preprocess`` command's flow raises ``exc``."""

    def use(exc: BaseException) -> None:
        def flow(cfg, **kwargs):
            raise exc

        monkeypatch.setitem(sys.modules, "_failing_stage", types.SimpleNamespace(flow=flow))
        monkeypatch.setitem(cli._FLOWS, "preprocess", "_failing_stage:flow")

    return use


def run(*args: str):
    return CliRunner().invoke(cli.app, ["preprocess", *args])


@pytest.mark.parametrize("exc, code", [
    (StorageUnavailable("cannot reach s3 at http://minio:9000; check runtime.s3_endpoint_url"), 1),
    (TrackingUnavailable("cannot reach MLflow at http://mlflow:5000; check MLFLOW_TRACKING_URI"),
     1),
    (TrainingBusy("training run r1 is being trained by another process: pid 7 on h1"), 1),
    (EvalError("dataset digits@abc has no val split; set data.val_fraction > 0"), 1),
    (ConfigError("invalid config: data.resolution: must be > 0"), 2),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_an_expected_error_is_one_line_and_its_exit_code(stage_raises, exc, code):
    stage_raises(exc)
    result = run()
    assert result.exit_code == code
    assert result.output == f"error: {exc}\n"  # no type name, no --debug hint, no trace


def test_an_unexpected_error_names_its_type_and_points_to_debug(stage_raises):
    stage_raises(KeyError("shape"))
    result = run()
    assert result.exit_code == 1
    assert result.output == "error: KeyError: 'shape' (rerun with --debug for the trace)\n"


@pytest.mark.parametrize("exc", [TrainingBusy("busy"), KeyError("shape")])
def test_debug_raises_the_error_itself(stage_raises, exc):
    stage_raises(exc)
    result = run("--debug")
    assert result.exit_code == 1 and result.exception is exc


def test_an_error_from_a_ray_task_shows_the_cause_not_the_worker_trace(stage_raises):
    """``ray.get`` raises RayTaskError(X): an X whose text is the worker's whole traceback."""
    from ray.exceptions import RayTaskError

    cause = EvalError("model makes 1x16 images but the dataset holds 1x8; use a matching model")
    stage_raises(RayTaskError("evaluate", "Traceback (most recent call last):\n  ...",
                              cause).as_instanceof_cause())
    result = run()
    assert result.exit_code == 1 and result.output == f"error: {cause}\n"


def test_a_bad_config_fails_with_2_before_the_stage_runs(stage_raises):
    stage_raises(AssertionError("the stage must not run"))
    result = run("--set", "data.resolutoin=3")
    assert result.exit_code == 2
    assert result.output.startswith("error: invalid config: unknown config key 'data.resolutoin';"
                                    " did you mean 'data.resolution'?")
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize("flow", ["register_flow", "promote_flow", "retrain_flow"])
def test_flows_that_decide_refuse_the_locked_test_split(flow, tmp_path):
    """evaluate.split=test is for reports: registering, promoting or retraining on it is refused
    before any work (no store is opened, nothing is evaluated), naming the key and the command
    that reports on test."""
    from flows import registry, retrain
    from flows.config import PipelineConfig

    fn = getattr(registry, flow, None) or getattr(retrain, flow)
    cfg = PipelineConfig.model_validate({"runtime": {"root": str(tmp_path / "root")},
                                         "evaluate": {"split": "test"}})
    with pytest.raises(errors.ConfigError, match=r"evaluate.split=test: .*evaluate "
                                                  r"--set evaluate.split=test"):
        fn.fn(cfg)
    assert not (tmp_path / "root").exists()

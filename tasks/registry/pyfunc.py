"""The model logged as an MLflow pyfunc written as code: :mod:`tasks.pyfunc_model` is the model's
code, its artifacts the safetensors weights, config.json and serving.json, the ``diffusion``
package travels as ``code_paths``, with an explicit signature and pinned requirements."""

from __future__ import annotations

import warnings
from pathlib import Path

from tasks.registry.session import _FLUENT_GUARD, _fluent_tracking_uri

# tasks/registry/pyfunc.py → tasks/pyfunc_model.py, logged as the model's code
PYFUNC_FILE = Path(__file__).parent.with_name("pyfunc_model.py")


def _log_pyfunc(uri: str, client, run_id: str, files: dict[str, str]):
    """``mlflow.pyfunc.log_model`` into run ``run_id``, leaving that run's status as it was.

    The fluent API needs the tracking URI in MLflow's process-wide global and an active run; both
    are set only for this call (under a lock, so concurrent registrations do not mix URIs).
    """
    import mlflow

    import diffusion
    from tasks.pyfunc_model import signature

    status = client.get_run(run_id).info.status
    with _FLUENT_GUARD, _fluent_tracking_uri(uri):
        active = mlflow.active_run()
        own = active is None or active.info.run_id != run_id
        if own:
            mlflow.start_run(run_id=run_id, nested=active is not None)
        try:
            # The signature is explicit; an input example would make MLflow predict at log time.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                return mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_FILE), artifacts=files,
                    code_paths=[str(Path(diffusion.__file__).parent)], signature=signature(),
                    pip_requirements=_pip_requirements())
        finally:
            if own:
                mlflow.end_run(status=status)


def _pip_requirements() -> list[str]:
    """Pinned requirements, given explicitly: inferring them would load the model in a subprocess
    on every registration. Local version suffixes (``+cpu``) are dropped so GPU hosts resolve."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}"
            for p in ("mlflow", "torch", "numpy", "pandas", "safetensors")]

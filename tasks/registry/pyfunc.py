"""The model logged as an MLflow pyfunc written as code: :mod:`tasks.pyfunc_model` is the model's
code, its artifacts the safetensors weights, config.json and serving.json, the ``diffusion``
package travels as ``code_paths``, with an explicit signature and pinned requirements (and the
pins of all they need, as constraints)."""

from __future__ import annotations

import tempfile
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
    with _FLUENT_GUARD, _fluent_tracking_uri(uri), tempfile.TemporaryDirectory() as tmp:
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
                    pip_requirements=_pip_requirements(Path(tmp)))
        finally:
            if own:
                mlflow.end_run(status=status)


MODEL_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "safetensors")


def _pip_requirements(directory: Path) -> list[str]:
    """Pinned requirements, given explicitly: inferring them would load the model in a subprocess
    on every registration. Local version suffixes (``+cpu``) are dropped so GPU hosts resolve.

    The packages the model imports are pinned, and so is everything they need as installed here
    (every install path installs requirements.lock), as a pip constraints file written into
    ``directory``, which MLflow saves beside the model (``constraints.txt``): a serving host
    installs what the model was registered with, not what its pip picks that day. As
    constraints, pins the host does not need (torch's CUDA libraries on a Mac) are ignored.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    todo = [(name, frozenset()) for name in MODEL_PACKAGES]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in pins and extras <= extras_seen[key]:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # required only where this host's markers do not reach
            continue
        pins[key] = dist.version.split("+")[0]
        extras_seen[key] = extras_seen.get(key, set()) | extras
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in {"", *extras_seen[key]}):
                todo.append((req.name, frozenset(req.extras)))
    constraints = directory / "constraints.txt"
    constraints.write_text("".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
    return [f"{p}=={pins[canonicalize_name(p)]}" for p in MODEL_PACKAGES] + [f"-c {constraints}"]

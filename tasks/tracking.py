"""MLflow tracking for pipeline runs: one MLflow run per training run name.

Default tracking store: SQLite under a local storage root (``<root>/mlflow.db``, artifacts in
``<root>/mlartifacts``). Any MLflow server by ``runtime.mlflow_uri`` or ``MLFLOW_TRACKING_URI``.
The driver creates (or, for a resumed run name, finds) the MLflow run and logs the flattened
config as params; rank 0 of the training workers logs metric curves and sample grids to it
through :class:`mlflow.MlflowClient` (no global active-run state inside Ray workers). Logging
failures inside the training loop are reported and do not stop training: the metrics are also
in Ray's checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from tasks.errors import TrackingError, TrackingUnavailable
from tasks.storage import credentials_to_mlflow, is_database_uri, redact

EXPERIMENT = "diffusion-pipeline"
RUN_NAME_TAG = "pipeline.run_name"


def tracking_uri(runtime, root) -> str:
    uri = runtime.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return credentials_to_mlflow(uri)  # MLflow prints run links with the URI it is given
    if not root.is_local:
        raise TrackingError(
            f"the storage root {root.describe()} is not local, so there is no default SQLite "
            "tracking store; set runtime.mlflow_uri or MLFLOW_TRACKING_URI to an MLflow server")
    return f"sqlite:///{os.path.join(root.path, 'mlflow.db')}"


def connect_uri(uri: str) -> str:
    """The URI an MLflow client opens for ``uri``: for a database store whose credentials
    :func:`tracking_uri` took out (MLflow has no password variable for one), the whole URI this
    process holds in MLFLOW_TRACKING_URI (put there from ``runtime.mlflow_uri``, or set so by
    the operator, on a cluster too) when it is ``uri`` plus credentials; else ``uri``. Only
    MLflow's clients get it: configs, results, logs and messages carry ``uri``."""
    full = os.environ.get("MLFLOW_TRACKING_URI")
    if full and full != uri and is_database_uri(uri) and redact(full) == uri:
        return full
    return uri


def scrub(text: str, uri: str) -> str:
    """``text`` (an MLflow or driver error) with the URI the client opened shown redacted."""
    full = connect_uri(uri)
    return text.replace(full, redact(full)) if full != uri else text


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, ``mlartifacts/`` beside
    the database (MLflow's default would be ``./mlruns`` in whatever directory the process runs
    in); for a server, its own default."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)[:6000]
    return out


def _experiment_id(client, uri: str, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    return exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_root(uri))


def ensure_experiment(uri: str, experiment: str = EXPERIMENT) -> str:
    """Open the tracking store (creating a SQLite one, and the pipeline's experiment, on first
    use) and return the experiment id: a cheap check, before hours of work, that MLflow is
    there. Raises :class:`TrackingUnavailable` / :class:`TrackingError`."""
    from mlflow import MlflowClient

    with explained(uri):
        return _experiment_id(MlflowClient(tracking_uri=connect_uri(uri)), uri, experiment)


def ensure_run(uri: str, root, run_name: str, *, params: dict[str, str], tags: dict[str, str],
               experiment: str = EXPERIMENT) -> str:
    """The MLflow run id for ``run_name`` (created with params and tags on first use)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=connect_uri(uri))
    with explained(uri):
        exp_id = _experiment_id(client, uri, experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.set_tag(run_id, "pipeline.resumed_at", str(int(time.time())))
            return run_id
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id,
                             params=[Param(k, v) for k, v in items[i:i + 100]])
        return run.info.run_id


@contextlib.contextmanager
def explained(uri: str):
    """MLflow and connection failures inside become :class:`TrackingUnavailable` (transient) or
    :class:`TrackingError`, naming the (redacted) URI."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        raise _explain(e, uri) from e


def _explain(e: Exception, uri: str) -> Exception:
    from mlflow.exceptions import MlflowException

    said = scrub(str(e), uri)
    if isinstance(e, OSError) or (isinstance(e, MlflowException) and is_unreachable(e)):
        return TrackingUnavailable(f"cannot reach MLflow at {redact(uri)}: {said}; check "
                                   "runtime.mlflow_uri / MLFLOW_TRACKING_URI")
    if isinstance(e, MlflowException):
        return TrackingError(f"MLflow at {redact(uri)} refused or failed: {said}")
    return e


def is_unreachable(e: BaseException) -> bool:
    """Connection refused, timeouts, exhausted HTTP retries, a locked SQLite file: transient
    (the tracking and registry calls share this test)."""
    text = str(e)
    return (isinstance(e, ConnectionError | TimeoutError)
            or type(e).__module__.startswith(("requests", "urllib3"))
            or "Max retries exceeded" in text or "Connection refused" in text
            or "timed out" in text or "timeout exception" in text
            or ("API request to" in text and "failed with" in text)
            or "database is locked" in text)


class RunLogger:
    """Rank-0 metric and artifact logging into an existing MLflow run; never raises."""

    def __init__(self, uri: str | None, run_id: str | None, echo):
        self.uri, self.run_id, self.echo = uri, run_id, echo
        self._client = None
        self._warned = False

    def _c(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=connect_uri(self.uri))
        return self._client

    def _guard(self, what: str, fn) -> None:
        if not self.run_id:
            return
        try:
            fn()
        except Exception as e:  # tracking must never take training down
            if not self._warned:
                self.echo(f"MLflow {what} failed ({type(e).__name__}: "
                          f"{scrub(str(e), self.uri or '')}); training continues")
                self._warned = True

    def metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        self._guard("metric logging", lambda: self._c().log_batch(self.run_id, metrics=batch))

    def artifact(self, path: str, artifact_path: str) -> None:
        self._guard("artifact upload",
                    lambda: self._c().log_artifact(self.run_id, path, artifact_path))


def find_run(uri: str, run_name: str, experiment: str = EXPERIMENT) -> str | None:
    """The MLflow run id of the training run ``run_name``, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=connect_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def log_json(uri: str, run_id: str, obj: Any, artifact_file: str) -> None:
    """Write ``obj`` as JSON to ``artifact_file`` in the run's artifacts (replacing it)."""
    import json

    from mlflow import MlflowClient

    MlflowClient(tracking_uri=connect_uri(uri)).log_text(run_id, json.dumps(obj, indent=2),
                                                         artifact_file)


def log_evaluation(uri: str, run_id: str, evaluation: dict, table_md: str) -> None:
    """The evaluation on the training run: ``eval.<metric>`` metrics and the table as
    ``evaluation/<eval key>.md``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=connect_uri(uri))
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(f"eval.{k}", float(v), ts, 0) for k, v in evaluation["metrics"].items()
        if isinstance(v, int | float)])
    client.log_text(run_id, table_md, f"evaluation/{evaluation['eval_key']}.md")


def finish_run(uri: str, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=connect_uri(uri)).set_terminated(run_id, status)

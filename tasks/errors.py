"""The pipeline's errors, as one hierarchy. A leaf module: it imports nothing from the project.

    PipelineError                   an expected failure: its message says what to do
    ├── TransientError              worth retrying later (the retry policy, tasks.retry)
    │   ├── StorageUnavailable          (also a StorageError)
    │   ├── RegistryUnavailable         (also a RegistryError)
    │   ├── TrackingUnavailable         (also a TrackingError)
    │   └── ClusterUnreachable          the Ray Jobs API did not answer for too long
    ├── ConfigError                 the config cannot be built (the CLI exits with 2)
    └── StorageError, DatasetNotFound, PreprocessError, TrainConfigError, TrainingBusy
        (TrainingLeaseLost), TrainingDiverged, RunNotFound, CheckpointError, LeaseBusy,
        EvalError, RegistryError, TrackingError, GenerateError, ClusterAuthError,
        StageJobFailed, StageTimeout, CodeMismatch
                                    fail at once; the same way every time

Each error also keeps the builtin base it always had (``ValueError``, ``RuntimeError``,
``LookupError``), so ``except ValueError`` around a stage still catches what it caught before.
The errors take only a message, so they pickle by value and cross Ray worker boundaries as
themselves. Weights that fail their integrity check raise
:class:`diffusion.serialization.WeightsIntegrityError`, which belongs to the math package.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An expected failure of a pipeline stage; the message names the cause and what to do."""


class TransientError(PipelineError):
    """A service did not answer (after its own bounded retries): trying again later may
    succeed, so the stage tasks retry it with backoff."""


class ConfigError(PipelineError, ValueError):
    """The config cannot be built; the message names the key and what to do."""


# Storage and data


class StorageError(PipelineError, RuntimeError):
    """Storage unreachable, bucket missing, permission denied: something to fix outside."""


class StorageUnavailable(StorageError, TransientError):
    """The storage endpoint did not answer (after botocore's bounded retries): transient, worth
    retrying later (:mod:`tasks.retry`), unlike a missing bucket or denied access."""


class DatasetNotFound(PipelineError, LookupError):
    """No committed version matches; the message lists what exists."""


class PreprocessError(PipelineError, ValueError):
    """Bad input that stops the stage (empty source, every input bad, strict-mode failures)."""


# Training


class TrainConfigError(PipelineError, ValueError):
    """The training config does not fit the dataset or is invalid; names the field."""


class TrainingBusy(PipelineError, RuntimeError):
    """Another process holds the training run's lease (the run is being trained)."""


class TrainingLeaseLost(TrainingBusy):
    """This driver lost the training run's lease while training (another driver took it over,
    or it could not be refreshed): training stopped before its next checkpoint."""


class TrainingDiverged(PipelineError, RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


class RunNotFound(PipelineError, LookupError):
    """No finished training run matches the config; says which run was looked for."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint is incomplete, truncated or does not match its recorded digests."""


class LeaseBusy(PipelineError, RuntimeError):
    """Another process holds the lease and kept refreshing it for the whole wait."""


# Evaluation, registry, tracking, generation


class EvalError(PipelineError, RuntimeError):
    """The model or the evaluation set cannot be evaluated as asked; says what to do."""


class RegistryError(PipelineError, RuntimeError):
    """A registry request that cannot succeed as asked: names what exists and what to set."""


class RegistryUnavailable(RegistryError, TransientError):
    """MLflow (or the lock storage) could not be reached after bounded retries: transient."""


class TrackingError(PipelineError, RuntimeError):
    """MLflow cannot be reached or refuses; names the URI and what to set."""


class TrackingUnavailable(TrackingError, TransientError):
    """MLflow could not be reached: transient, worth retrying later (:mod:`tasks.retry`)."""


class GenerateError(PipelineError, ValueError):
    """The job cannot run as configured; names the setting and what to do."""


# Cluster execution (Ray Jobs)


class ClusterUnreachable(TransientError, ConnectionError):
    """The Ray Jobs API did not answer for longer than the wait allows. The job itself may still
    be running: a rerun re-attaches to it rather than starting another."""


class ClusterAuthError(PipelineError, PermissionError):
    """The Ray cluster refused this client's credentials (its token); names what to set."""


class StageJobFailed(PipelineError, RuntimeError):
    """A stage's Ray Job failed without a pipeline error of its own (a crash, an OOM kill, a
    stopped job); the message names the job and ends with the tail of its log."""


class StageTimeout(PipelineError, TimeoutError):
    """A stage ran past its timeout (``runtime.stage_timeouts``); names the stage and the job."""


class CodeMismatch(PipelineError, RuntimeError):
    """A Ray Job's request was made by other code than the node that runs it holds: names both
    versions and what to install (:mod:`tasks.code`)."""

"""Stages as Ray Jobs: submit once, re-attach, follow, read the result back from storage.

When the Ray address is a Jobs API address (``http(s)://<head>:8265``, in ``runtime.ray_address``
or ``RAY_ADDRESS``, Ray's own convention for ``ray job submit``), each Ray stage runs inside the
cluster as a Ray Job whose entrypoint is this project's CLI (``diffusion-pipeline job-run
<request>``); the flow-run process only submits, follows and reads back. The job outlives its
driver: a Prefect worker that is killed, rescheduled or cut off from the cluster costs nothing
but the log lines it missed.

- **Idempotent submission.** The submission id names the stage and its fingerprint
  (``train-<run name>``, ``preprocess-<dataset>-<version>``, ...). A driver that finds that job
  pending or running re-attaches to it (one log line says so) instead of starting another; a
  job that succeeded is read back; a failed or stopped one is resubmitted as ``<id>-a2``,
  ``-a3``... (training resumes from its latest checkpoint). Two drivers submitting at the same
  moment are told apart by Ray itself: the second submission of an id is refused, and that
  driver re-attaches.
- **What crosses.** The request (stage + arguments, credentials stripped) and the result or
  error are JSON files under ``<root>/jobs/<submission id>/``. Nothing secret goes into the
  job's entrypoint, metadata or ``runtime_env`` (the dashboard shows them): the cluster's
  nodes hold their own credentials (AWS_*, MLFLOW_TRACKING_USERNAME/PASSWORD).
- **Following.** The job's log is streamed into ``echo`` (the Prefect run log): its status is
  polled every ``poll_s``, its log as often while short and less often as it grows
  (:func:`log_interval`; the API returns the whole log each time). While the Jobs
  API does not answer (a network partition, a restarting head), the driver keeps polling for up
  to ``runtime.ray_jobs_unreachable_s`` and says so once; the job runs on regardless. A stage
  past its timeout (``runtime.stage_timeouts``) is stopped and fails with
  :class:`~tasks.errors.StageTimeout`. Cancelling the Prefect flow run stops the job; any other
  interruption of the driver (Ctrl-C, SIGTERM of an evicted pod) leaves it running and says how
  to stop it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks import errors
from tasks.errors import ClusterAuthError, ClusterUnreachable, StageJobFailed, StageTimeout
from tasks.storage import Location, atomic_write_bytes, exists, read_json, redact

Echo = Callable[[str], Any]

JOBS_DIR = "jobs"
REQUEST = "request.json"
RESULT = "result.json"
ERROR = "error.json"
ENTRYPOINT = "diffusion-pipeline job-run"
ERROR_MARK = "diffusion-pipeline-error: "
# HTTP timeouts of one Jobs API call: (connect, read) seconds. Without them a request sent into
# a partition waits for the kernel's TCP timeouts (minutes).
HTTP_TIMEOUT = (5.0, 30.0)
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The stages' progress lines in a job's log: training's "step 120/2000", generation's
# "3000/10000 samples".
PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b|\b(\d+)/(\d+) samples\b")


def is_jobs_address(address: str | None) -> bool:
    """True for a Ray Jobs API address (``http://`` or ``https://``)."""
    return bool(address) and address.startswith(("http://", "https://"))


def fingerprint(payload: Any, n: int = 16) -> str:
    """A short digest of ``payload`` (JSON, keys sorted): a job key for stages whose inputs
    name their result."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120]


@dataclass(frozen=True)
class StageJob:
    """One stage to run as a Ray Job: ``args`` is what :func:`tasks.stages.run_stage` takes."""

    stage: str
    key: str  # the stage's fingerprint: the same inputs give the same key
    args: dict = field(hash=False)

    @property
    def base_id(self) -> str:
        return _slug(f"{self.stage}-{self.key}")

    def submission_id(self, attempt: int) -> str:
        return self.base_id if attempt == 1 else f"{self.base_id}-a{attempt}"


def job_dir(root: Location, submission_id: str) -> Location:
    return root.child(JOBS_DIR, submission_id)


def _client_class():
    from ray.job_submission import JobSubmissionClient

    class _Client(JobSubmissionClient):
        """Ray's client with a timeout on every request (its own has none)."""

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", HTTP_TIMEOUT)
            return super()._do_request(method, endpoint, **kwargs)

    return _Client


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.exceptions.RequestException, ConnectionError, TimeoutError)


# The SDK raises RuntimeError("Request failed with status code N: ...") for any non-2xx answer.
# These mean "not now" rather than "no": a proxy or load balancer in front of the head (502,
# 503, 504), and Ray's own 500 "No available agent to submit job, please try again later" while
# the head's dashboard agent (re)starts (seen on a loopback head during a benchmark).
_RETRY_LATER = re.compile(r"status code 50[234]\b|try again later", re.IGNORECASE)


def _not_now(e: BaseException) -> bool:
    """Whether ``e`` is an answer of the Jobs API that asks to try again later."""
    return isinstance(e, RuntimeError) and bool(_RETRY_LATER.search(str(e)))


class JobRunner:
    """Runs :class:`StageJob` s on the cluster at ``address`` (a Jobs API address)."""

    def __init__(self, address: str, root: Location, *, echo: Echo = print,
                 timeout_s: float | None = None, unreachable_s: float = 600.0,
                 poll_s: float = 2.0, entrypoint: str = ENTRYPOINT,
                 entrypoint_args: tuple[str, ...] = (),
                 progress: Callable[[float], Any] | None = None,
                 client: Callable[[str], Any] | None = None):
        self.address = address.rstrip("/")
        self.progress = progress
        self._new_client = client or _client_class()
        self.root = root
        self.echo = echo
        self.timeout_s = timeout_s
        self.unreachable_s = unreachable_s
        self.poll_s = poll_s
        self.entrypoint = entrypoint
        self.entrypoint_args = entrypoint_args
        self._client = None

    # -- the Jobs API, with partitions tolerated ---------------------------------------------

    def _api(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, retried while the Jobs API does not answer (or answers "try again
        later": :func:`_not_now`), for up to ``unreachable_s``; then
        :class:`ClusterUnreachable`."""
        t0 = time.monotonic()
        warned = False
        while True:
            try:
                if self._client is None:
                    self._client = _authenticated(self.address, self._new_client, self.address)
                out = _authenticated(self.address, fn, self._client)
                if warned:
                    self.echo(f"the Ray Jobs API at {self.address} answers again after "
                              f"{time.monotonic() - t0:.0f} s")
                return out
            except Exception as e:
                if not (isinstance(e, _unreachable_errors()) or _not_now(e)):
                    raise
                waited = time.monotonic() - t0
                if waited > self.unreachable_s:
                    raise ClusterUnreachable(
                        f"the Ray Jobs API at {self.address} did not answer for {waited:.0f} s "
                        f"while {what} ({type(e).__name__}); the job may still be running on "
                        "the cluster: a rerun re-attaches to it. Check the head node and the "
                        "network (runtime.ray_jobs_unreachable_s sets the wait)") from None
                if not warned:
                    how = ("answers \"try again later\"" if _not_now(e)
                           else f"does not answer ({type(e).__name__})")
                    self.echo(f"the Ray Jobs API at {self.address} {how} while {what}; "
                              f"retrying for up to {self.unreachable_s:.0f} s (the job itself "
                              "runs on)")
                    warned = True
                time.sleep(min(self.poll_s * 2, 10.0))

    def _info(self, submission_id: str):
        """The job's JobDetails, or None if the cluster knows no such job."""
        def get(client):
            try:
                return client.get_job_info(submission_id)
            except RuntimeError as e:  # the SDK's error for any non-2xx answer
                if "404" in str(e) or "does not exist" in str(e):
                    return None
                raise
        return self._api(f"looking up job {submission_id}", get)

    # -- submit or re-attach -------------------------------------------------------------------

    def run(self, job: StageJob) -> dict:
        """Run ``job`` to its end (submitting it, or re-attaching to it) and return its result."""
        submission_id = self._attach_or_submit(job)
        info = self._follow(submission_id, job.stage)
        return self._outcome(submission_id, job.stage, info)

    def _attach_or_submit(self, job: StageJob) -> str:
        attempt = 1
        while True:
            sid = job.submission_id(attempt)
            info = self._info(sid)
            if info is None:
                break
            status = _status(info)
            if status in ("PENDING", "RUNNING"):
                self.echo(f"re-attaching to Ray job {sid} ({status.lower()} since "
                          f"{_when(info.start_time)}) instead of submitting another")
                return sid
            if status == "SUCCEEDED" and exists(job_dir(self.root, sid).child(RESULT)):
                self.echo(f"Ray job {sid} already succeeded; reading its result")
                return sid
            self.echo(f"Ray job {sid} ended {status.lower()}; submitting attempt {attempt + 1}")
            attempt += 1
        return self._submit(job, sid, attempt)

    def _submit(self, job: StageJob, sid: str, attempt: int) -> str:
        where = job_dir(self.root, sid)
        request = {"stage": job.stage, "key": job.key, "attempt": attempt, "args": job.args,
                   "result": where.child(RESULT).url, "error": where.child(ERROR).url}
        atomic_write_bytes(where.child(REQUEST), json.dumps(request, indent=2).encode())
        entrypoint = " ".join([self.entrypoint, *self.entrypoint_args,
                               _quote(where.child(REQUEST).url)])

        def submit(client):
            try:
                return client.submit_job(
                    entrypoint=entrypoint, submission_id=sid,
                    metadata={"stage": job.stage, "key": job.key[:100], "attempt": str(attempt)})
            except RuntimeError as e:
                if "already exists" in str(e):
                    return None
                raise
        if self._api(f"submitting job {sid}", submit) is None:
            self.echo(f"Ray job {sid} was submitted meanwhile by another driver; re-attaching")
        else:
            self.echo(f"submitted Ray job {sid} to {redact(self.address)}")
        return sid

    # -- follow --------------------------------------------------------------------------------

    def _follow(self, sid: str, stage: str):
        """Stream the job's log into ``echo`` until it ends; returns its final JobDetails."""
        shown = 0  # characters of the log already echoed
        next_log = 0.0  # when to fetch the log next (time.monotonic)
        try:
            while True:
                info = self._info(sid)
                if info is None:
                    raise StageJobFailed(f"Ray job {sid} disappeared from {self.address} (the "
                                         "head node restarted without its job table?); rerun "
                                         "to resubmit it")
                final = _status(info) in _TERMINAL
                if final or time.monotonic() >= next_log:
                    logs = self._api(f"reading the log of {sid}",
                                     lambda c: c.get_job_logs(sid)) or ""
                    shown = self._echo_new(logs, shown, final=final)
                    next_log = time.monotonic() + log_interval(len(logs), self.poll_s)
                if final:
                    return info
                started = (info.start_time or time.time() * 1000) / 1000
                if self.timeout_s is not None and time.time() - started > self.timeout_s:
                    self._api(f"stopping {sid}", lambda c: c.stop_job(sid))
                    raise StageTimeout(
                        f"stage {stage} ran past its timeout of {self.timeout_s:.0f} s (Ray job "
                        f"{sid}, stopped); raise runtime.stage_timeouts.{stage} if it needs "
                        "longer, or look at the job's log for where it hangs")
                time.sleep(self.poll_s)
        except (KeyboardInterrupt, SystemExit, *_prefect_signals()) as e:
            self._interrupted(sid, e)
            raise

    def _echo_new(self, logs: str, shown: int, final: bool) -> int:
        if len(logs) < shown:  # a new log (should not happen): show it whole
            shown = 0
        new = logs[shown:]
        end = len(new) if final else new.rfind("\n") + 1
        for line in new[:end].splitlines():
            if line.strip():
                self.echo(line)
                self._progress(line)
        return shown + end

    def _progress(self, line: str) -> None:
        if self.progress is None:
            return
        m = PROGRESS.search(line)
        if m:
            done, total = (int(g) for g in m.groups() if g is not None)
            if total > 0:
                self.progress(min(done / total, 1.0))

    def _interrupted(self, sid: str, e: BaseException) -> None:
        if _flow_run_cancelling():
            try:
                (self._client or self._new_client(self.address)).stop_job(sid)
                self.echo(f"flow run cancelled: stopped Ray job {sid}")
            except Exception as stop_error:
                self.echo(f"flow run cancelled but Ray job {sid} could not be stopped "
                          f"({stop_error}); stop it with: ray job stop {sid} --address "
                          f"{redact(self.address)}")
        else:
            self.echo(f"interrupted ({type(e).__name__}): Ray job {sid} keeps running on the "
                      "cluster; a rerun re-attaches to it. Stop it with: ray job stop "
                      f"{sid} --address {redact(self.address)}")

    # -- the outcome ---------------------------------------------------------------------------

    def _outcome(self, sid: str, stage: str, info) -> dict:
        where = job_dir(self.root, sid)
        status = _status(info)
        if status == "SUCCEEDED" and exists(where.child(RESULT)):
            return read_json(where.child(RESULT))
        try:
            logs = self._api(f"reading the log of {sid}", lambda c: c.get_job_logs(sid)) or ""
        except ClusterUnreachable:
            logs = ""
        record = error_in_log(logs)
        if record is None and exists(where.child(ERROR)):
            record = read_json(where.child(ERROR))
        if record is not None:
            raise error_from_record(record, sid)
        tail = "\n".join(logs.strip().splitlines()[-15:])
        why = info.message or status.lower()
        raise StageJobFailed(f"stage {stage} failed: Ray job {sid} ended {status.lower()} "
                             f"({why}) without a result; rerun to resubmit it"
                             + (f". Last lines of its log:\n{tail}" if tail else ""))


# The Jobs API returns a job's whole log on every call (it has no offset). Following a job that
# runs for days re-reads a log that keeps growing, so the log is fetched less often as it grows:
# about LOG_BYTES_PER_S on average, at least every poll and at most LOG_MAX_INTERVAL_S apart
# (the job's status is still polled at every poll; its end always fetches the rest).
LOG_BYTES_PER_S = 128 * 1024
LOG_MAX_INTERVAL_S = 60.0


def log_interval(size: int, poll_s: float) -> float:
    """Seconds until the next fetch of a log of ``size`` characters."""
    return min(LOG_MAX_INTERVAL_S, max(poll_s, size / LOG_BYTES_PER_S))


def _authenticated(address: str, fn: Callable[[Any], Any], client: Any) -> Any:
    """``fn(client)``, with Ray's AuthenticationError explained."""
    try:
        return fn(client)
    except Exception as e:
        if type(e).__name__ != "AuthenticationError":
            raise
        raise ClusterAuthError(
            f"the Ray cluster at {address} refused this client ({str(e).splitlines()[0]}). A "
            "cluster with token authentication needs RAY_AUTH_MODE=token and its token in "
            "RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH) in this process's "
            "environment") from None


def _status(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def _when(ms: int | None) -> str:
    if not ms:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _prefect_signals() -> tuple[type[BaseException], ...]:
    """Prefect's TerminationSignal (SIGTERM in a flow run), if Prefect is loaded: a process
    that never imported Prefect cannot receive it (and need not pay for the import)."""
    exceptions = sys.modules.get("prefect.exceptions")
    return (exceptions.TerminationSignal,) if exceptions is not None else ()


def _flow_run_cancelling() -> bool:
    """True if this process runs a Prefect flow run that is being cancelled."""
    if "prefect" not in sys.modules:
        return False
    try:
        from prefect import get_client
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if not run_id:
            return False
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return state is not None and state.type.value in ("CANCELLING", "CANCELLED")
    except Exception:
        return False


# -- errors across the job boundary ------------------------------------------------------------


def error_record(e: BaseException) -> dict:
    """What the job writes when its stage fails: the error's type and message."""
    return {"type": type(e).__name__, "module": type(e).__module__, "message": str(e)}


def error_line(record: dict) -> str:
    """The job's last log line when its stage fails: the error record as one JSON line. The
    log reaches the driver through Ray, so the error does even when storage is what failed."""
    return ERROR_MARK + json.dumps(record)


def error_in_log(logs: str) -> dict | None:
    """The error record of :func:`error_line` in a job's log, or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(ERROR_MARK):
            try:
                return json.loads(line[len(ERROR_MARK):])
            except ValueError:
                return None
    return None


def error_from_record(record: dict, sid: str) -> BaseException:
    """The pipeline error the job raised, as itself (so the retry policy and the CLI see the
    same type as in-process); anything else as :class:`StageJobFailed`."""
    name, message = record.get("type", ""), record.get("message", "")
    cls = getattr(errors, name, None)
    if record.get("module") == "diffusion.serialization" and name == "WeightsIntegrityError":
        from diffusion.serialization import WeightsIntegrityError

        cls = WeightsIntegrityError
    if isinstance(cls, type) and issubclass(cls, Exception) and (
            cls.__module__ in ("tasks.errors", "diffusion.serialization")):
        return cls(message)
    return StageJobFailed(f"Ray job {sid} failed: {name}: {message}")

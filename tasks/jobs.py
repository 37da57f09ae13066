"""Stages as Ray Jobs: submit once, re-attach, follow, read the result back from storage.

When the Ray address is a Jobs API address (``http(s)://<head>:8265``, in ``runtime.ray_address``
or ``RAY_ADDRESS``, Ray's own convention for ``ray job submit``), each Ray stage runs inside the
cluster as a Ray Job whose entrypoint is this project's CLI (``diffusion-pipeline job-run
<request>``); the flow-run process only submits, follows and reads back. The job outlives its
driver: a Prefect worker that is killed, rescheduled or cut off from the cluster costs nothing
but the log lines it missed.

- **Identity.** A job is named by its stage, a readable name (the run name, the dataset
  version...) and a digest of its *identity*: everything that changes its output (the stage's
  arguments with registry aliases resolved to versions, the storage root, the tracking server,
  the code: :mod:`tasks.code`), less the settings that only change how it is run or watched
  (:class:`StageJob`). A changed request is a new job, never an old result.
- **Idempotent submission.** A driver that finds its job pending or running re-attaches to it
  (one log line says so) instead of starting another; a job that succeeded is read back; a
  failed or stopped one is resubmitted as ``<id>-a2``, ``-a3``... (training resumes from its
  latest checkpoint). Before re-attaching or reading back, the job's stored request is compared
  with this one: a job submitted for another request (a missing or different ``request.json``)
  is never reused. Two drivers submitting at the same moment are told apart by Ray itself: the
  second submission of an id is refused, and that driver re-attaches.
- **A lost head.** A job the cluster no longer knows (its head restarted without its job
  table) or that Ray ended because its supervisor died (``JOB_SUPERVISOR_ACTOR_DIED``, also
  seen after a head replacement with GCS fault tolerance) is resubmitted as the next attempt,
  up to ``runtime.ray_jobs_resubmits`` times: every stage resumes from what it stored.
- **What crosses.** The request (stage + arguments, credentials stripped, the code's version
  and digest) and the result or error are JSON files under ``<root>/jobs/<submission id>/``.
  Nothing secret goes into the job's entrypoint, metadata or ``runtime_env`` (the dashboard
  shows them): the cluster's nodes hold their own credentials (AWS_*,
  MLFLOW_TRACKING_USERNAME/PASSWORD). Every address in a message is redacted.
- **Following.** The job's status is polled every ``poll_s``; its log is streamed into ``echo``
  (the Prefect run log) through Ray's log tail (``tail_job_logs``), read in chunks in a thread
  and handed over through a bounded queue: a log of any size is held a chunk at a time. While
  the Jobs API does not answer (a network partition, a restarting head), the driver keeps
  polling for up to ``runtime.ray_jobs_unreachable_s`` and says so once; the job runs on
  regardless. A stage past its timeout (``runtime.stage_timeouts``, counted on this driver's
  clock from when it began to run or follow the stage) is stopped and fails with
  :class:`~tasks.errors.StageTimeout`. Cancelling the Prefect flow run stops the job; any other
  interruption of the driver (Ctrl-C, SIGTERM of an evicted pod) leaves it running and says how
  to stop it. Which exceptions interrupt and whether the run is cancelled is the orchestrator's
  to say: :class:`RunHooks`, which :mod:`flows.hooks` installs (tasks/ never imports Prefect).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import queue
import re
import shlex
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tasks import errors
from tasks.code import code_identity, describe
from tasks.errors import ClusterAuthError, ClusterUnreachable, StageJobFailed, StageTimeout
from tasks.storage import Location, atomic_write_bytes, exists, read_json, redact, scrub

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
# Ray's error types of a job that ended because its supervisor actor was lost, not because the
# stage failed: after a head restart or replacement (ray-project/ray#65025, #65608). The stage
# resumes from what it stored, so such a job is resubmitted.
SUPERVISOR_LOST = frozenset({"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"})
# The stages' progress lines in a job's log: training's "step 120/2000", generation's
# "3000/10000 samples".
PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b|\b(\d+)/(\d+) samples\b")
# Following a log: chunks waiting for the driver (the reader waits beyond this; Ray's chunks
# hold at most 20,000 characters), the longest line kept whole (longer ones are cut, saying so),
# the lines kept for a failure's message, and how long the driver waits for the log's end once
# the job has ended.
LOG_QUEUE_CHUNKS = 64
LOG_MAX_LINE = 16 * 1024
LOG_TAIL_LINES = 15
LOG_END_WAIT_S = 30.0


def is_jobs_address(address: str | None) -> bool:
    """True for a Ray Jobs API address (``http://`` or ``https://``)."""
    return bool(address) and address.startswith(("http://", "https://"))


def digest(payload: Any) -> str:
    """sha256 of ``payload`` as JSON with sorted keys, hex."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text: str, n: int = 100) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:n].rstrip("-")


@dataclass(frozen=True)
class StageJob:
    """One stage to run as a Ray Job.

    ``args`` is what :func:`tasks.stages.run_stage` takes; ``identity`` is everything that
    changes the job's output (:func:`tasks.stages.job_identity`); ``name`` is a readable part of
    the submission id (a run name, a dataset version), which ends with a digest of the identity
    and the code (:func:`tasks.code.code_identity`): the same request on the same code always
    gets the same id, any other gets another.
    """

    stage: str
    name: str
    args: dict = field(hash=False)
    identity: dict = field(hash=False)

    @property
    def request_digest(self) -> str:
        return digest({"stage": self.stage, "identity": self.identity,
                       "code": code_identity()["digest"]})

    @property
    def base_id(self) -> str:
        return f"{_slug(f'{self.stage}-{self.name}')}-{self.request_digest[:12]}"

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


# -- what the orchestrator tells the driver ----------------------------------------------------


def _never() -> bool:
    return False


@dataclass(frozen=True)
class RunHooks:
    """What the orchestrator running this process tells the job driver, without tasks/ knowing
    which orchestrator it is (tasks/ never imports Prefect; :mod:`flows.hooks` installs
    Prefect's with :func:`set_run_hooks`).

    ``stop_signals``: exceptions, besides KeyboardInterrupt and SystemExit, that mean this
    process is being stopped (Prefect raises TerminationSignal on SIGTERM). ``cancelled``: True
    while the run this process works for is being cancelled; then an interrupted driver stops
    its Ray job, otherwise the job runs on. The defaults are a plain process's: no signals of
    its own, never cancelled.
    """

    stop_signals: tuple[type[BaseException], ...] = ()
    cancelled: Callable[[], bool] = _never


HOOKS = RunHooks()


def set_run_hooks(hooks: RunHooks) -> None:
    """Install the orchestrator's hooks for every driver in this process."""
    global HOOKS
    HOOKS = hooks


def _cancelled() -> bool:
    """The installed check; one that fails (its API did not answer) counts as not cancelled,
    so the interruption that asked is what propagates."""
    try:
        return bool(HOOKS.cancelled())
    except Exception:
        return False


@dataclass
class _Ending:
    """How following a job ended: its final JobDetails (None: the cluster lost the job), the
    last lines of its log and the stage's error record if the log carried one."""

    info: Any
    last_lines: list[str]
    record: dict | None


class JobRunner:
    """Runs :class:`StageJob` s on the cluster at ``address`` (a Jobs API address)."""

    def __init__(self, address: str, root: Location, *, echo: Echo = print,
                 timeout_s: float | None = None, unreachable_s: float = 600.0,
                 poll_s: float = 2.0, resubmits: int = 2, entrypoint: str = ENTRYPOINT,
                 entrypoint_args: tuple[str, ...] = (),
                 progress: Callable[[float], Any] | None = None,
                 client: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.address = address.rstrip("/")
        self.scrub = lambda text: scrub(text, address)  # others' messages may quote it
        self.clock = clock  # the driver's clock, which alone times the stage
        self.shown_address = redact(self.address)  # what messages say: never its credentials
        self.progress = progress
        self._new_client = client or _client_class()
        self.root = root
        self.echo = echo
        self.timeout_s = timeout_s
        self.unreachable_s = unreachable_s
        self.poll_s = poll_s
        self.resubmits = resubmits
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
                    self._client = _authenticated(self.shown_address, self._new_client,
                                                  self.address, self.scrub)
                out = _authenticated(self.shown_address, fn, self._client, self.scrub)
                if warned:
                    self.echo(f"the Ray Jobs API at {self.shown_address} answers again after "
                              f"{time.monotonic() - t0:.0f} s")
                return out
            except Exception as e:
                if not (isinstance(e, _unreachable_errors()) or _not_now(e)):
                    raise
                waited = time.monotonic() - t0
                if waited > self.unreachable_s:
                    raise ClusterUnreachable(
                        f"the Ray Jobs API at {self.shown_address} did not answer for "
                        f"{waited:.0f} s while {what} ({type(e).__name__}); the job may still be "
                        "running on the cluster: a rerun re-attaches to it. Check the head node "
                        "and the network (runtime.ray_jobs_unreachable_s sets the wait)"
                    ) from None
                if not warned:
                    how = ("answers \"try again later\"" if _not_now(e)
                           else f"does not answer ({type(e).__name__})")
                    self.echo(f"the Ray Jobs API at {self.shown_address} {how} while {what}; "
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

    # -- submit or re-attach, resubmit what the cluster lost ------------------------------------

    def run(self, job: StageJob) -> dict:
        """Run ``job`` to its end (submitting it, or re-attaching to it) and return its result.
        The stage's timeout counts from here, on this driver's clock."""
        started = self.clock()
        attempt, lost = 1, 0
        while True:
            sid, attempt = self._attach_or_submit(job, attempt)
            ending = self._follow(sid, job.stage, started)
            why = _lost(ending, self.scrub)
            if why is None:
                return self._outcome(sid, job.stage, ending)
            lost += 1
            if lost > self.resubmits:
                raise StageJobFailed(
                    f"stage {job.stage}: Ray job {sid} {why}, and so did the "
                    f"{self.resubmits} resubmission(s) before it; check the cluster's head "
                    f"node (runtime.ray_jobs_resubmits sets how many times it is resubmitted)")
            attempt += 1
            self.echo(f"Ray job {sid} {why}; resubmitting it as attempt {attempt} "
                      f"({lost} of at most {self.resubmits}): the stage resumes from what it "
                      "stored")

    def _attach_or_submit(self, job: StageJob, attempt: int) -> tuple[str, int]:
        while True:
            sid = job.submission_id(attempt)
            info = self._info(sid)
            if info is None:
                break
            status = _status(info)
            other = self._other_request(job, sid)
            if other:
                self.echo(f"Ray job {sid} ({status.lower()}) was submitted for another request "
                          f"({other}); it is not reused: submitting attempt {attempt + 1}")
            elif status in ("PENDING", "RUNNING"):
                self.echo(f"re-attaching to Ray job {sid} ({status.lower()} since "
                          f"{_when(info.start_time)}) instead of submitting another")
                return sid, attempt
            elif status == "SUCCEEDED" and exists(job_dir(self.root, sid).child(RESULT)):
                self.echo(f"Ray job {sid} already succeeded; reading its result")
                return sid, attempt
            else:
                self.echo(f"Ray job {sid} ended {status.lower()}; submitting attempt "
                          f"{attempt + 1}")
            attempt += 1
        return self._submit(job, sid, attempt), attempt

    def _other_request(self, job: StageJob, sid: str) -> str | None:
        """Why the job ``sid`` found on the cluster is not this request's (None: it is)."""
        where = job_dir(self.root, sid).child(REQUEST)
        if not exists(where):
            return f"no {REQUEST} under {self.root.describe()}: another storage root's"
        stored = read_json(where)
        if stored.get("request_digest") == job.request_digest:
            return None
        theirs, ours = _flat(stored.get("identity") or {}), _flat(job.identity)
        keys = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        if stored.get("code") != code_identity():
            keys.append(f"code: {describe(stored.get('code'))}")
        return "differs in " + (", ".join(keys[:6]) or "its digest")

    def _submit(self, job: StageJob, sid: str, attempt: int) -> str:
        where = job_dir(self.root, sid)
        request = {"stage": job.stage, "name": job.name, "attempt": attempt,
                   "request_digest": job.request_digest, "code": code_identity(),
                   "identity": job.identity, "args": job.args,
                   "result": where.child(RESULT).url, "error": where.child(ERROR).url}
        atomic_write_bytes(where.child(REQUEST), json.dumps(request, indent=2).encode())
        entrypoint = " ".join([self.entrypoint, *self.entrypoint_args,
                               shlex.quote(where.child(REQUEST).url)])

        def submit(client):
            try:
                return client.submit_job(
                    entrypoint=entrypoint, submission_id=sid,
                    metadata={"stage": job.stage, "name": job.name[:100],
                              "attempt": str(attempt)})
            except RuntimeError as e:
                if "already exists" in str(e):
                    return None
                raise
        if self._api(f"submitting job {sid}", submit) is None:
            self.echo(f"Ray job {sid} was submitted meanwhile by another driver; re-attaching")
        else:
            self.echo(f"submitted Ray job {sid} to {self.shown_address}")
        return sid

    # -- follow --------------------------------------------------------------------------------

    def _follow(self, sid: str, stage: str, started: float) -> _Ending:
        """Stream the job's log into ``echo`` until it ends (or the cluster loses it)."""
        log = _LogFollower(lambda: self._client.tail_job_logs(sid), self.scrub)
        try:
            while True:
                info = self._info(sid)
                if info is None:  # the cluster no longer knows it
                    log.stop()
                    return _Ending(None, list(log.last), log.record)
                if _status(info) in _TERMINAL:
                    self._show(log, time.monotonic() + LOG_END_WAIT_S, until_end=True)
                    log.stop()
                    return _Ending(info, list(log.last), log.record)
                if self.timeout_s is not None and self.clock() - started > self.timeout_s:
                    log.stop()
                    self._api(f"stopping {sid}", lambda c: c.stop_job(sid))
                    raise StageTimeout(
                        f"stage {stage} ran past its timeout of {self.timeout_s:.0f} s (Ray job "
                        f"{sid}, stopped); raise runtime.stage_timeouts.{stage} if it needs "
                        "longer, or look at the job's log for where it hangs")
                self._show(log, time.monotonic() + self.poll_s)
        except (KeyboardInterrupt, SystemExit, *HOOKS.stop_signals) as e:
            log.stop()
            self._interrupted(sid, e)
            raise

    def _show(self, log: _LogFollower, deadline: float, until_end: bool = False) -> None:
        """Echo the log's lines as they arrive until ``deadline`` (or, ``until_end``, until the
        log has ended; a log whose end does not come by then is left, saying so)."""
        log.start()
        while True:
            left = deadline - time.monotonic()
            if log.ended.is_set() and log.chunks.empty():
                if not until_end:
                    time.sleep(max(left, 0.0))
                return
            if left <= 0:
                if until_end:
                    self.echo(f"the end of the job's log did not arrive within "
                              f"{LOG_END_WAIT_S:.0f} s; `ray job logs` shows it whole")
                return
            try:
                kind, lines = log.chunks.get(timeout=left)
            except queue.Empty:
                continue
            for line in lines:
                self.echo(line)
                if kind == "lines":
                    self._progress(line)

    def _progress(self, line: str) -> None:
        if self.progress is None:
            return
        m = PROGRESS.search(line)
        if m:
            done, total = (int(g) for g in m.groups() if g is not None)
            if total > 0:
                self.progress(min(done / total, 1.0))

    def _interrupted(self, sid: str, e: BaseException) -> None:
        if _cancelled():
            try:
                (self._client or self._new_client(self.address)).stop_job(sid)
                self.echo(f"flow run cancelled: stopped Ray job {sid}")
            except Exception as stop_error:
                self.echo(f"flow run cancelled but Ray job {sid} could not be stopped "
                          f"({self.scrub(str(stop_error))}); stop it with: ray job stop {sid} "
                          f"--address {self.shown_address}")
        else:
            self.echo(f"interrupted ({type(e).__name__}): Ray job {sid} keeps running on the "
                      "cluster; a rerun re-attaches to it. Stop it with: ray job stop "
                      f"{sid} --address {self.shown_address}")

    # -- the outcome ---------------------------------------------------------------------------

    def _outcome(self, sid: str, stage: str, ending: _Ending) -> dict:
        where = job_dir(self.root, sid)
        info = ending.info
        status = _status(info)
        if status == "SUCCEEDED" and exists(where.child(RESULT)):
            return read_json(where.child(RESULT))
        message = self.scrub(info.message or "")
        record = ending.record or error_in_log(message)
        if record is None and exists(where.child(ERROR)):
            record = read_json(where.child(ERROR))
        if record is not None:
            raise error_from_record(record, sid)
        tail = "\n".join(ending.last_lines)
        if _command_missing(info, message, tail):
            raise StageJobFailed(
                f"stage {stage}: Ray job {sid} could not start `{self.entrypoint}` (exit code "
                f"127: no such command on the cluster). The cluster's nodes need this project "
                f"installed, the same release as this side ({describe(code_identity())}): build "
                "the image from infra/Dockerfile, or `pip install` this project on every node")
        why = message or status.lower()
        raise StageJobFailed(f"stage {stage} failed: Ray job {sid} ended {status.lower()} "
                             f"({why}) without a result; rerun to resubmit it"
                             + (f". Last lines of its log:\n{tail}" if tail else ""))


def _lost(ending: _Ending, scrub: Callable[[str], str]) -> str | None:
    """Why the job's ending means the cluster lost it (so it is resubmitted), or None."""
    if ending.info is None:
        return "disappeared from the cluster (its head restarted without its job table?)"
    if (_status(ending.info) == "FAILED" and ending.record is None
            and str(getattr(ending.info, "error_type", None) or "") in SUPERVISOR_LOST):
        return (f"was ended by Ray ({ending.info.error_type}: "
                f"{scrub(ending.info.message or '')[:200]})")
    return None


def _command_missing(info, message: str, tail: str) -> bool:
    """Whether the job failed because its entrypoint's command does not exist on the node."""
    code = getattr(info, "driver_exit_code", None)
    return code == 127 or "exit code 127" in message or (
        "diffusion-pipeline" in tail and ("command not found" in tail or "not found" in tail))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


class _LogFollower:
    """A job's log, followed through Ray's streaming tail (``tail_job_logs``: a websocket that
    yields the log in chunks of at most 20,000 characters as it is written, and ends after the
    job has ended). Read in a thread and handed to the driver a line at a time through a
    bounded queue, so a log of any size is held a few chunks and :data:`LOG_MAX_LINE` at a time. A
    dropped connection is reopened after a pause; Ray's tail starts again at the log's
    beginning, so the characters already read are skipped. The driver's thread does all the
    echoing (a Prefect run logger belongs to its thread's context)."""

    def __init__(self, connect: Callable[[], AsyncIterator[str]], scrub: Callable[[str], str]):
        self._connect = connect
        self._scrub = scrub
        self.chunks: queue.Queue[tuple[str, list[str]]] = queue.Queue(maxsize=LOG_QUEUE_CHUNKS)
        self.ended = threading.Event()  # the tail ended: the job's log was read to its end
        self.last: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.record: dict | None = None  # the stage's error record, if a line carried one
        self._seen = 0  # characters of the log read so far
        self._partial = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ray-job-log", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                asyncio.run(self._read())
                if self._partial:
                    self._put("lines", self._lines([self._partial]))
                    self._partial = ""
                self.ended.set()
                self._put("end", [])  # wakes a driver waiting for the next chunk
                return
            except Exception as e:
                failures += 1
                if failures == 1:
                    self._put("note", [f"following the job's log failed ({type(e).__name__}: "
                                       f"{self._scrub(str(e))[:200]}); reconnecting"])
                self._stop.wait(min(0.05 * 2 ** failures, 10.0))

    async def _read(self) -> None:
        skip = self._seen
        async for chunk in self._connect():
            if self._stop.is_set():
                return
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            self._seen += len(chunk)
            *whole, self._partial = (self._partial + chunk).split("\n")
            if len(self._partial) > LOG_MAX_LINE:
                whole.append(self._partial)
                self._partial = ""
            self._put("lines", self._lines(whole))

    def _lines(self, lines: list[str]) -> list[str]:
        """The non-empty lines, each cut at LOG_MAX_LINE; notes the last ones and the stage's
        error record."""
        out = []
        for line in lines:
            if len(line) > LOG_MAX_LINE:
                line = line[:LOG_MAX_LINE] + f" [... {len(line) - LOG_MAX_LINE} characters cut]"
            if line.startswith(ERROR_MARK):
                self.record = error_in_log(line) or self.record
            if line.strip():
                out.append(line)
        self.last.extend(out[-LOG_TAIL_LINES:])
        return out

    def _put(self, kind: str, lines: list[str]) -> None:
        while lines is not None and not self._stop.is_set():
            try:
                self.chunks.put((kind, lines), timeout=0.1)
                return
            except queue.Full:
                continue


def _authenticated(address: str, fn: Callable[[Any], Any], client: Any,
                   scrub: Callable[[str], str]) -> Any:
    """``fn(client)``, with Ray's AuthenticationError explained (``address`` is what the
    message shows; ``scrub`` takes the address's credentials out of Ray's own words)."""
    try:
        return fn(client)
    except Exception as e:
        if type(e).__name__ != "AuthenticationError":
            raise
        raise ClusterAuthError(
            f"the Ray cluster at {address} refused this client "
            f"({scrub(str(e).splitlines()[0])}). A cluster with token authentication needs "
            "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN (or a file named by "
            "RAY_AUTH_TOKEN_PATH) in this process's environment") from None


def _status(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def _when(ms: int | None) -> str:
    if not ms:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


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

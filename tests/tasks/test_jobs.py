"""Stages as Ray Jobs (tasks.jobs, tasks.stages): submission, re-attachment, read-back, errors,
partitions, timeouts and interruptions, against an in-memory stand-in for Ray's
JobSubmissionClient. The real Jobs API across hosts is tests/testbed's."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tasks import errors
from tasks.jobs import (
    ERROR,
    REQUEST,
    RESULT,
    JobRunner,
    RunHooks,
    StageJob,
    error_from_record,
    error_record,
    is_jobs_address,
    job_dir,
)
from tasks.storage import Location


@dataclass
class FakeJob:
    status: str = "PENDING"
    logs: str = ""
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))
    message: str | None = None
    entrypoint: str = ""
    error_type: str | None = None
    driver_exit_code: int | None = None


class FakeCluster:
    """What the Jobs API holds; ``script(sid, job, calls)`` moves a job on at each look-up."""

    def __init__(self, root: Location, script=None):
        self.root = root
        self.jobs: dict[str, FakeJob] = {}
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.script = script
        self.down = 0  # the next N calls fail as if the network were partitioned
        self.busy = 0  # the next N calls are answered "try again later"
        self.calls = 0

    def client(self, address: str):
        return FakeClient(self)


class FakeClient:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def _net(self):
        self.c.calls += 1
        if self.c.down > 0:
            self.c.down -= 1
            raise requests.exceptions.ConnectionError("no route to host")
        if self.c.busy > 0:
            self.c.busy -= 1
            raise RuntimeError("Request failed with status code 500: No available agent to "
                               "submit job, please try again later..")

    def get_job_info(self, sid):
        self._net()
        if sid not in self.c.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        job = self.c.jobs[sid]
        if self.c.script:
            self.c.script(sid, job, self.c)
        return job

    async def tail_job_logs(self, sid):
        """Ray's tail: the log from its beginning in chunks, as it grows, until the job has
        ended and its log is read. It consumes none of ``down``/``busy`` (those script the
        status calls) but fails while the network is down."""
        pos = 0
        while True:
            if self.c.down > 0:
                raise requests.exceptions.ConnectionError("no route to host")
            job = self.c.jobs.get(sid)
            if job is None:
                raise RuntimeError(f"Job '{sid}' does not exist.")
            ended = job.status in ("SUCCEEDED", "FAILED", "STOPPED")  # before reading the log
            if pos < len(job.logs):
                chunk = job.logs[pos:pos + 20000]
                pos += len(chunk)
                yield chunk
            elif ended:
                return
            else:
                await asyncio.sleep(0.001)

    def submit_job(self, *, entrypoint, submission_id, metadata=None):
        self._net()
        if submission_id in self.c.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.c.jobs[submission_id] = FakeJob(entrypoint=entrypoint)
        self.c.submitted.append(submission_id)
        return submission_id

    def stop_job(self, sid):
        self._net()
        self.c.stopped.append(sid)
        self.c.jobs[sid].status = "STOPPED"
        return True


def succeed(result: dict, lines=("step 5/10", "step 10/10")):
    """A script: the job runs, logs ``lines`` one per look-up, writes ``result``, succeeds."""
    def script(sid, job, cluster):
        if job.status == "PENDING":
            job.status = "RUNNING"
        elif job.status == "RUNNING":
            done = job.logs.count("\n")
            if done < len(lines):
                job.logs += lines[done] + "\n"
            else:
                where = Path(job_dir(cluster.root, sid).path)
                where.mkdir(parents=True, exist_ok=True)
                (where / RESULT).write_text(json.dumps(result))
                job.status = "SUCCEEDED"
    return script


@pytest.fixture
def root(tmp_path) -> Location:
    return Location.of(str(tmp_path / "root"), {})


def runner(cluster: FakeCluster, lines: list[str], **kw) -> JobRunner:
    return JobRunner("http://head:8265", cluster.root, echo=lines.append, poll_s=0.001,
                     client=cluster.client, **kw)


JOB = StageJob("train", "digits-abc-123", {"config": {"x": 1}}, {"config": {"x": 1}})
SID = JOB.submission_id(1)


def found(cluster: FakeCluster, sid: str, job: FakeJob, request: StageJob | None = JOB) -> None:
    """A job the cluster already holds, with the request.json ``request``'s driver wrote."""
    from tasks.code import code_identity

    cluster.jobs[sid] = job
    if request is not None:
        where = Path(job_dir(cluster.root, sid).path)
        where.mkdir(parents=True, exist_ok=True)
        (where / REQUEST).write_text(json.dumps({
            "stage": request.stage, "request_digest": request.request_digest,
            "code": code_identity(), "identity": request.identity, "args": request.args}))


def test_jobs_addresses():
    assert is_jobs_address("http://head:8265") and is_jobs_address("https://h:443")
    assert not is_jobs_address("ray://head:10001") and not is_jobs_address("head:6379")
    assert not is_jobs_address(None) and not is_jobs_address("")


def test_submit_follow_and_read_back(root):
    cluster = FakeCluster(root, succeed({"run_name": "r", "step": 10}))
    lines, progress = [], []
    out = runner(cluster, lines, progress=progress.append).run(JOB)
    assert out == {"run_name": "r", "step": 10}
    assert cluster.submitted == [SID]
    req = json.loads((Path(job_dir(root, SID).path) / REQUEST).read_text())
    assert req["stage"] == "train" and req["args"] == {"config": {"x": 1}} and req["attempt"] == 1
    assert req["result"].endswith(f"/jobs/{SID}/result.json")
    entry = cluster.jobs[SID].entrypoint
    assert entry.startswith("diffusion-pipeline job-run ") and entry.endswith("request.json")
    assert "step 5/10" in lines and "step 10/10" in lines  # the job's log, streamed
    assert progress == [0.5, 1.0]


def test_a_running_job_is_re_attached_not_submitted_again(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    found(cluster, SID, FakeJob(status="RUNNING", logs="step 5/10\n"))
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 1}
    assert cluster.submitted == []
    assert sum(f"re-attaching to Ray job {SID}" in m for m in lines) == 1


def test_a_succeeded_job_is_read_back(root):
    cluster = FakeCluster(root)
    found(cluster, SID, FakeJob(status="SUCCEEDED"))
    where = Path(job_dir(root, SID).path)
    (where / RESULT).write_text('{"done": true}')
    assert runner(cluster, []).run(JOB) == {"done": True}
    assert cluster.submitted == []


def test_failed_and_stopped_attempts_are_resubmitted_with_a_suffix(root):
    cluster = FakeCluster(root, succeed({"ok": 3}))
    cluster.jobs[SID] = FakeJob(status="FAILED")
    cluster.jobs[JOB.submission_id(2)] = FakeJob(status="STOPPED")
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 3}
    assert cluster.submitted == [JOB.submission_id(3)]
    req = json.loads((Path(job_dir(root, JOB.submission_id(3)).path) / REQUEST).read_text())
    assert req["attempt"] == 3


def test_a_concurrent_submission_of_the_same_id_re_attaches(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    real_submit = FakeClient.submit_job

    def racing(self, **kw):  # another driver's submission lands first
        self.c.jobs[kw["submission_id"]] = FakeJob(status="RUNNING")
        return real_submit(self, **kw)

    lines: list[str] = []
    FakeClient.submit_job = racing
    try:
        assert runner(cluster, lines).run(JOB) == {"ok": 1}
    finally:
        FakeClient.submit_job = real_submit
    assert cluster.submitted == []
    assert any("submitted meanwhile by another driver" in m for m in lines)


def test_a_pipeline_error_in_the_job_is_raised_as_itself(root):
    def fail(sid, job, cluster):
        where = Path(job_dir(cluster.root, sid).path)
        where.mkdir(parents=True, exist_ok=True)
        (where / ERROR).write_text(json.dumps(error_record(
            errors.TrainingDiverged("loss is nan at step 7"))))
        job.status = "FAILED"

    cluster = FakeCluster(root, fail)
    with pytest.raises(errors.TrainingDiverged, match="loss is nan at step 7"):
        runner(cluster, []).run(JOB)


def test_an_error_reaches_the_driver_through_the_log_when_storage_is_down(root):
    from tasks.jobs import error_line

    def fail(sid, job, cluster):  # no error.json: the job could not write to storage
        job.logs = "listing s3://b/raw\n" + error_line(error_record(
            errors.StorageUnavailable("s3 endpoint http://s3:5000 did not answer"))) + "\n"
        job.status = "FAILED"

    with pytest.raises(errors.StorageUnavailable, match="did not answer"):
        runner(FakeCluster(root, fail), []).run(JOB)


def test_a_crashed_job_fails_with_its_log_tail(root):
    def crash(sid, job, cluster):
        job.logs = "starting\nKilled (OOM)\n"
        job.status, job.message = "FAILED", "Job entrypoint command failed with exit code 137"

    cluster = FakeCluster(root, crash)
    with pytest.raises(errors.StageJobFailed) as e:
        runner(cluster, []).run(JOB)
    text = str(e.value)
    assert SID in text and "exit code 137" in text and "Killed (OOM)" in text


def test_error_records_map_to_pipeline_errors_only():
    e = error_from_record({"type": "StorageUnavailable", "module": "tasks.errors",
                           "message": "s3 down"}, "sid")
    assert isinstance(e, errors.StorageUnavailable) and isinstance(e, errors.TransientError)
    other = error_from_record({"type": "ZeroDivisionError", "module": "builtins",
                               "message": "x"}, "sid")
    assert type(other) is errors.StageJobFailed and "ZeroDivisionError: x" in str(other)
    assert type(error_from_record({"type": "Path", "module": "pathlib"}, "s")) is \
        errors.StageJobFailed


def test_a_partition_is_waited_out(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    cluster.down = 3
    lines: list[str] = []
    r = runner(cluster, lines, unreachable_s=30)
    r.poll_s = 0.001
    assert r.run(JOB) == {"ok": 1}
    assert sum("does not answer" in m for m in lines) == 1
    assert any("answers again" in m for m in lines)
    assert cluster.submitted == [SID]


def test_try_again_later_is_waited_out_like_a_partition_and_other_errors_are_not(root):
    """Ray's 500 "No available agent to submit job, please try again later" (its dashboard
    agent restarting) and a proxy's 502/503/504 are retried; any other answer is an error."""
    from tasks.jobs import _not_now

    cluster = FakeCluster(root, succeed({"ok": 1}))
    cluster.busy = 3
    lines: list[str] = []
    r = runner(cluster, lines, unreachable_s=30)
    assert r.run(JOB) == {"ok": 1}
    assert sum('answers "try again later"' in m for m in lines) == 1
    assert cluster.submitted == [SID]
    assert _not_now(RuntimeError("Request failed with status code 503: Service Unavailable."))
    assert not _not_now(RuntimeError("Request failed with status code 500: bad runtime_env."))
    assert not _not_now(RuntimeError("Request failed with status code 400: try later"))


def test_a_long_partition_fails_as_transient_without_stopping_the_job(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    found(cluster, SID, FakeJob(status="RUNNING"))
    cluster.down = 10**6
    with pytest.raises(errors.ClusterUnreachable, match="a rerun re-attaches") as e:
        runner(cluster, [], unreachable_s=0.05).run(JOB)
    assert isinstance(e.value, errors.TransientError)
    assert cluster.stopped == []


def test_a_stage_past_its_timeout_is_stopped(root):
    cluster = FakeCluster(root)  # the job runs forever
    found(cluster, SID, FakeJob(status="RUNNING"))
    now = [0.0]

    def clock():  # the driver's clock: 10 s pass at every look
        now[0] += 10.0
        return now[0]

    with pytest.raises(errors.StageTimeout, match="stage train ran past its timeout of 60 s"):
        runner(cluster, [], timeout_s=60, clock=clock).run(JOB)
    assert cluster.stopped == [SID]


def test_the_timeout_is_counted_on_the_drivers_clock_not_the_heads(root):
    """The head's clock ten days off (its start_time) does not make a job time out: the
    timeout counts the time this driver has spent on the stage (item 9)."""
    cluster = FakeCluster(root, succeed({"ok": 1}))
    past = int((time.time() - 10 * 24 * 3600) * 1000)
    found(cluster, SID, FakeJob(status="RUNNING", start_time=past))
    assert runner(cluster, [], timeout_s=3600).run(JOB) == {"ok": 1}
    assert cluster.stopped == []


def interrupted_cluster(root, monkeypatch, exc) -> FakeCluster:
    """A cluster running job SID whose follower is interrupted by ``exc`` (Ctrl-C, SIGTERM or an
    orchestrator's stop signal) on its third look at the job."""
    cluster = FakeCluster(root)
    found(cluster, SID, FakeJob(status="RUNNING"))
    real_info = FakeClient.get_job_info

    def interrupt(self, sid):
        if self.c.calls > 2:
            raise exc
        return real_info(self, sid)

    monkeypatch.setattr(FakeClient, "get_job_info", interrupt)
    return cluster


@pytest.mark.parametrize("cancelled", [False, True])
def test_an_interrupted_driver_stops_the_job_only_when_the_flow_run_is_cancelled(
        root, monkeypatch, cancelled):
    import tasks.jobs

    # Ctrl-C (or SIGTERM) while following the job
    cluster = interrupted_cluster(root, monkeypatch, KeyboardInterrupt)
    monkeypatch.setattr(tasks.jobs, "HOOKS", RunHooks(cancelled=lambda: cancelled))
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner(cluster, lines).run(JOB)
    if cancelled:
        assert cluster.stopped == [SID]
        assert any("flow run cancelled: stopped Ray job" in m for m in lines)
    else:
        assert cluster.stopped == []
        assert any("keeps running on the cluster" in m
                   and f"ray job stop {SID}" in m for m in lines)


class Terminated(BaseException):
    """An orchestrator's own stop signal (Prefect's TerminationSignal on SIGTERM)."""


@pytest.mark.parametrize("cancelled", [False, True])
def test_the_orchestrators_stop_signal_interrupts_the_driver_like_ctrl_c(
        root, monkeypatch, cancelled):
    """tasks/ knows no orchestrator: the stop signals and the cancellation check are what
    flows/ installs (flows/hooks.py), and they act as Prefect's did."""
    import tasks.jobs

    cluster = interrupted_cluster(root, monkeypatch, Terminated)
    monkeypatch.setattr(tasks.jobs, "HOOKS",
                        RunHooks(stop_signals=(Terminated,), cancelled=lambda: cancelled))
    lines: list[str] = []
    with pytest.raises(Terminated):
        runner(cluster, lines).run(JOB)
    assert cluster.stopped == ([SID] if cancelled else [])
    said = "flow run cancelled: stopped Ray job" if cancelled else "interrupted (Terminated)"
    assert any(said in m for m in lines), lines


def test_a_failing_cancellation_check_counts_as_not_cancelled(root, monkeypatch):
    """The check asks the orchestrator's API, which may not answer: the job keeps running and
    the driver says how to stop it, and the interruption itself is what propagates."""
    import tasks.jobs

    def unreachable() -> bool:
        raise ConnectionError("the Prefect API did not answer")

    cluster = interrupted_cluster(root, monkeypatch, KeyboardInterrupt)
    monkeypatch.setattr(tasks.jobs, "HOOKS", RunHooks(cancelled=unreachable))
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner(cluster, lines).run(JOB)
    assert cluster.stopped == []
    assert any("keeps running on the cluster" in m for m in lines), lines


def test_a_plain_process_has_no_stop_signals_and_is_never_cancelled():
    assert RunHooks().stop_signals == () and RunHooks().cancelled() is False


def test_a_refused_token_is_explained(root):
    class AuthenticationError(Exception):
        pass

    def refuse(address):
        raise AuthenticationError("Unauthorized: Missing authentication token")

    r = JobRunner("http://head:8265", root, echo=lambda m: None, client=refuse)
    with pytest.raises(errors.ClusterAuthError, match="RAY_AUTH_MODE=token"):
        r.run(JOB)


def test_submission_ids_are_readable_and_safe():
    job = StageJob("evaluate", "models:/m/3 weird key", {}, {"model_ref": "models:/m/3"})
    base = job.submission_id(1)
    assert base.startswith("evaluate-models-m-3-weird-key-") and len(base.rsplit("-", 1)[1]) == 12
    assert job.submission_id(2) == base + "-a2"
    long = StageJob("train", "r" * 128, {}, {})  # a run name may be 128 characters
    assert len(long.submission_id(1)) <= 113 and long.request_digest[:12] in long.submission_id(1)


# -- a job's identity: a different request is never answered with an old result (item 1) --------


def test_a_succeeded_job_of_another_request_is_not_read_back(root):
    """A job found under this id whose stored request differs (here: another identity written
    under the same id) is not reused: the next attempt runs this request."""
    other = StageJob("train", JOB.name, {"config": {"x": 2}}, {"config": {"x": 2}})
    cluster = FakeCluster(root, succeed({"ok": "new"}))
    found(cluster, SID, FakeJob(status="SUCCEEDED"), request=other)
    (Path(job_dir(root, SID).path) / RESULT).write_text('{"ok": "old"}')
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": "new"}
    assert cluster.submitted == [JOB.submission_id(2)]
    assert any("submitted for another request" in m and "config.x" in m for m in lines)


@pytest.mark.parametrize("status", ["RUNNING", "SUCCEEDED"])
def test_a_job_without_this_roots_request_is_not_reused(root, status):
    """Staging and production on one Ray cluster: a job whose request.json is not under this
    root (another root submitted it) is neither re-attached nor read back."""
    cluster = FakeCluster(root, succeed({"ok": 1}))
    found(cluster, SID, FakeJob(status=status), request=None)
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 1}
    assert cluster.submitted == [JOB.submission_id(2)]
    assert any("another storage root" in m for m in lines)


def _config(tmp_path, *sets: str, root: str = "root") -> dict:
    from flows.config import load_config

    return load_config(None, list(sets), str(tmp_path / root)).to_json_dict()


def _submitted(monkeypatch, stage: str, args: dict) -> StageJob:
    """The StageJob tasks.stages.execute hands to the Jobs runner for ``args``."""
    import tasks.jobs
    from tasks.stages import execute

    seen: list[StageJob] = []

    class Runner:
        def __init__(self, *a, **kw):
            pass

        def run(self, job):
            seen.append(job)
            return {}

    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setattr(tasks.jobs, "JobRunner", Runner)
    execute(stage, args, echo=lambda m: None)
    return seen[0]


def test_a_generate_job_is_named_by_the_champions_version_not_the_alias(tmp_path, monkeypatch):
    """Week 1 the champion is v3, week 2 v4: two jobs, each sampling its version. (Before, the
    key was computed before the alias was resolved, and week 2 got week 1's samples.)"""
    import tasks.registry

    versions = iter(["3", "4"])
    monkeypatch.setattr(tasks.registry, "resolve", lambda ref, uri: {"version": next(versions)})
    args = {"config": _config(tmp_path, "generate.model=models:/digits@champion"),
            "default_model": None}
    week1, week2 = (_submitted(monkeypatch, "generate", args) for _ in range(2))
    assert week1.args["config"]["generate"]["model"] == "models:/digits/3"
    assert week2.args["config"]["generate"]["model"] == "models:/digits/4"
    assert week1.submission_id(1) != week2.submission_id(1)
    assert "models-digits-3" in week1.submission_id(1)


def test_a_train_job_covers_steps_and_the_root_but_not_how_it_is_watched(tmp_path, monkeypatch):
    """An explicit run name with more steps is a new job (before: the old job's result, and the
    run never trained on); so is another storage root; how often it logs or checkpoints, or its
    timeout, is not (a rerun re-attaches to the running job)."""
    import tasks.train

    monkeypatch.setattr(tasks.train, "plan_run", lambda c: (c["train"]["run_name"], False))

    def job(*sets, root="root"):
        config = _config(tmp_path, "train.run_name=weekly", *sets, root=root)
        return _submitted(monkeypatch, "train", {"config": config}).submission_id(1)

    base = job("train.steps=800")
    assert job("train.steps=1600") != base
    assert job("train.steps=800", root="staging") != base
    assert job("train.steps=800", "train.checkpoint_every=50", "train.log_every=5",
               "runtime.stage_timeouts.train=60", "runtime.ray_jobs_unreachable_s=5") == base
    assert base.startswith("train-weekly-")


def test_the_job_run_entrypoint_refuses_another_releases_request(tmp_path):
    """Item 11: the cluster runs the code its image holds; a request made by other code is
    refused in one line naming both, before the stage runs."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.code import code_identity
    from tasks.jobs import error_in_log

    where = tmp_path / "jobs" / "train-x"
    where.mkdir(parents=True)
    theirs = {"version": "0.0.9", "digest": "f" * 64}
    (where / REQUEST).write_text(json.dumps({
        "stage": "train", "name": "x", "attempt": 1, "code": theirs, "args": {},
        "result": str(where / RESULT), "error": str(where / ERROR)}))
    res = CliRunner().invoke(app, ["job-run", str(where / REQUEST)])
    assert res.exit_code == 1, res.output
    record = error_in_log(res.output)
    assert record["type"] == "CodeMismatch"
    assert "0.0.9 (code ffffffffffff)" in record["message"]
    assert code_identity()["digest"][:12] in record["message"]
    assert not (where / RESULT).exists()


def test_a_missing_command_on_the_cluster_says_what_to_install(root):
    def missing(sid, job, cluster):
        job.logs = "/bin/sh: 1: diffusion-pipeline: not found\n"
        job.status, job.driver_exit_code = "FAILED", 127
        job.message = "Job entrypoint command failed with exit code 127"

    with pytest.raises(errors.StageJobFailed, match="no such command on the cluster") as e:
        runner(FakeCluster(root, missing), []).run(JOB)
    assert "infra/Dockerfile" in str(e.value) and "diffusion-pipeline " in str(e.value)


# -- a lost head: resubmitted, bounded (item 12) -------------------------------------------------


def test_a_job_the_cluster_lost_is_resubmitted_and_resumes(root):
    """The head restarts without its job table while the job runs: the job is resubmitted as
    the next attempt (no person needed), and that one finishes."""
    def script(sid, job, cluster):
        if sid == SID and job.status == "RUNNING" and "step 3/10" in job.logs:
            cluster.jobs.clear()  # a fresh head: it knows no job
            return
        succeed({"ok": sid}, lines=("step 3/10", "step 10/10"))(sid, job, cluster)

    cluster = FakeCluster(root, script)
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": JOB.submission_id(2)}
    assert cluster.submitted == [SID, JOB.submission_id(2)]
    assert any("disappeared from the cluster" in m and "resubmitting it as attempt 2" in m
               for m in lines)


def test_a_job_ended_by_a_dead_supervisor_is_resubmitted_a_stage_error_is_not(root):
    def script(sid, job, cluster):
        if sid == SID:
            job.status, job.error_type = "FAILED", "JOB_SUPERVISOR_ACTOR_DIED"
            job.message = "Job supervisor actor died: the actor's node was lost"
        else:
            succeed({"ok": 2})(sid, job, cluster)

    lines: list[str] = []
    assert runner(FakeCluster(root, script), lines).run(JOB) == {"ok": 2}
    assert any("JOB_SUPERVISOR_ACTOR_DIED" in m for m in lines)

    def stage_error(sid, job, cluster):  # the stage itself failed: not the cluster's doing
        from tasks.jobs import error_line

        job.logs = error_line(error_record(errors.TrainingDiverged("nan at 7"))) + "\n"
        job.status, job.error_type = "FAILED", "JOB_ENTRYPOINT_COMMAND_ERROR"

    cluster = FakeCluster(Location.of(root.url + "/b", {}), stage_error)
    with pytest.raises(errors.TrainingDiverged):
        runner(cluster, []).run(JOB)
    assert len(cluster.submitted) == 1


def test_resubmissions_are_bounded(root):
    def vanish(sid, job, cluster):
        cluster.jobs.pop(sid)

    cluster = FakeCluster(root, vanish)
    with pytest.raises(errors.StageJobFailed, match=r"runtime\.ray_jobs_resubmits"):
        runner(cluster, [], resubmits=2).run(JOB)
    assert cluster.submitted == [SID, JOB.submission_id(2), JOB.submission_id(3)]


# -- following a log of any size with bounded memory (item 8) ------------------------------------


@pytest.mark.slow
def test_a_huge_log_is_followed_in_bounded_memory(root, monkeypatch):
    """A 32 MB log (and one 1 MB line) reaches the driver line by line, while the driver holds
    a few MB at most: the log is never held whole (before: fetched whole, on every poll)."""
    import tracemalloc

    line = "step 1/2 " + "x" * 90 + "\n"
    n = 32 * 2**20 // len(line) // 100 * 100

    async def tail(self, sid):
        for _ in range(n // 100):
            yield line * 100
        yield "y" * 2**20 + "\nstep 2/2\n"

    def script(sid, job, cluster):
        job.status = "RUNNING" if job.status == "PENDING" else job.status

    cluster = FakeCluster(root, script)
    monkeypatch.setattr(FakeClient, "tail_job_logs", tail)
    count = {"lines": 0, "last": ""}

    def echo(m):
        count["lines"] += 1
        count["last"] = m
        if m == "step 2/2":
            cluster.jobs[SID].status = "SUCCEEDED"
            where = Path(job_dir(root, SID).path)
            (where / RESULT).write_text('{"ok": 1}')

    tracemalloc.start()
    try:
        r = JobRunner("http://head:8265", root, echo=echo, poll_s=0.01, client=cluster.client)
        assert r.run(JOB) == {"ok": 1}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count["last"] == "step 2/2" and count["lines"] >= n
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB for a 32 MB log"


# -- tasks.stages and the job's entrypoint -------------------------------------------------------


def test_the_job_gets_no_ray_address_and_no_credential():
    from tasks.stages import for_job

    args = {"config": {"runtime": {"root": "s3://b/p", "ray_address": "http://h:8265",
                                   "mlflow_uri": None}, "train": {}}}
    out = for_job("train", args, "http://admin:s3cret@mlflow:5000", "s3://b/p")
    assert out["config"]["runtime"]["ray_address"] is None
    assert out["config"]["runtime"]["mlflow_uri"] == "http://mlflow:5000"
    assert "s3cret" not in json.dumps(out)
    pre = for_job("preprocess", {"data": {}, "runtime": {"ray_address": "http://h:8265",
                                                         "root": "./here"}}, None, "/abs/here")
    assert pre["runtime"]["ray_address"] is None
    assert pre["runtime"]["root"] == "/abs/here"  # the job runs in another working directory


def test_a_jobs_address_cannot_be_joined_as_a_driver(monkeypatch):
    from tasks.runtime import RuntimeConfig, ensure_ray, jobs_address

    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    cfg = RuntimeConfig()
    assert jobs_address(cfg) == "http://head:8265"
    assert jobs_address(RuntimeConfig(ray_address="ray://head:10001")) is None
    import ray

    if not ray.is_initialized():
        with pytest.raises(errors.ConfigError, match="Ray Jobs API address"):
            ensure_ray(cfg)


def test_an_in_process_stage_past_its_timeout_fails_naming_it():
    from tasks.stages import _deadline

    with pytest.raises(errors.StageTimeout, match="stage train ran past its timeout"), \
            _deadline("train", 0.05):
        time.sleep(5)
    with _deadline("train", 5):  # and a stage within its time is untouched
        time.sleep(0.01)


def test_stage_timeouts_are_config(tmp_path):
    from flows.config import load_config

    cfg = load_config(None, ["runtime.stage_timeouts.train=3600"], str(tmp_path))
    assert cfg.runtime.stage_timeouts.train == 3600
    assert cfg.runtime.stage_timeouts.generate == 24 * 3600
    with pytest.raises(errors.ConfigError):
        load_config(None, ["runtime.stage_timeouts.trian=1"], str(tmp_path))


def test_job_run_stores_the_stage_error_and_exits_non_zero(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import PipelineConfig
    from tasks.code import code_identity

    root = tmp_path / "root"
    config = PipelineConfig.model_validate({"runtime": {"root": str(root)}}).to_json_dict()
    where = tmp_path / "jobs" / "train-x"
    where.mkdir(parents=True)
    request = {"stage": "train", "name": "x", "attempt": 1, "args": {"config": config},
               "code": code_identity(),
               "result": str(where / RESULT), "error": str(where / ERROR)}
    (where / REQUEST).write_text(json.dumps(request))
    res = CliRunner().invoke(app, ["job-run", str(where / REQUEST)])
    assert res.exit_code == 1, res.output
    record = json.loads((where / ERROR).read_text())
    assert record["type"] == "DatasetNotFound" and "digits" in record["message"]
    from tasks.jobs import error_in_log

    assert error_in_log(res.output) == record  # the same record, as the log's last line
    assert not (where / RESULT).exists()
    assert isinstance(error_from_record(record, "train-x"), errors.DatasetNotFound)


def test_a_job_keeps_ray_datas_progress_tables_in_its_log_file_not_on_the_console():
    import logging

    from flows.cli import quiet_ray_data_console

    quiet_ray_data_console()
    handlers = logging.getLogger("ray.data").handlers
    files = [h for h in handlers if "File" in type(h).__name__]
    console = [h for h in handlers if h not in files]
    assert files and console
    assert all(h.level >= logging.WARNING for h in console)
    assert all(h.level <= logging.INFO for h in files)  # the session's ray-data.log keeps them


def test_job_run_reports_an_unreadable_request_as_its_error_line(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.jobs import error_in_log

    res = CliRunner().invoke(app, ["job-run", str(tmp_path / "nowhere" / REQUEST)])
    assert res.exit_code != 0
    record = error_in_log(res.output)
    assert record is not None and "nowhere" in record["message"], res.output


# -- credentials in the Jobs API address never reach a message (item 7) --------------------------

SECRETS = ["s3cret", "pa#ss?w0rd", "p/ss@w:rd", "p%23w"]


@pytest.mark.parametrize("secret", SECRETS)
def test_no_message_carries_the_addresss_credentials(root, monkeypatch, secret):
    """Every path that names the Jobs API address (submitted, partition warnings, gave up,
    interrupted, cancelled with a failed stop, refused token, a failed job's message) with a
    password in the address: the password appears in no line and no error."""
    import tasks.jobs

    address = f"http://admin:{secret}@head:8265"
    said: list[str] = []

    def run(cluster, **kw):
        r = JobRunner(address, cluster.root, echo=said.append, poll_s=0.001,
                      client=kw.pop("client", cluster.client), **kw)
        try:
            r.run(JOB)
        except BaseException as e:
            said.append(str(e))

    cluster = FakeCluster(root, succeed({"ok": 1}))
    cluster.down = 3
    run(cluster, unreachable_s=30)  # submitted, "does not answer", "answers again"
    down = FakeCluster(Location.of(root.url + "/3", {}))  # gave up
    down.down = 10**6
    run(down, unreachable_s=0.01)

    def crash(sid, job, cluster):
        job.status = "FAILED"
        job.message = f"Job supervisor could not reach {address}: connection refused"

    run(FakeCluster(Location.of(root.url + "/4", {}), crash))
    for cancelled in (False, True):
        cluster = FakeCluster(Location.of(root.url + f"/5{cancelled}", {}))
        found(cluster, SID, FakeJob(status="RUNNING"))

        real_info = FakeClient.get_job_info

        def interrupt(self, sid, real_info=real_info):  # while following
            if self.c.calls > 1:
                raise KeyboardInterrupt
            return real_info(self, sid)

        def refuse_stop(self, sid):
            raise RuntimeError(f"could not stop the job at {address}")

        with monkeypatch.context() as m:
            m.setattr(FakeClient, "get_job_info", interrupt)
            m.setattr(FakeClient, "stop_job", refuse_stop)
            m.setattr(tasks.jobs, "HOOKS", RunHooks(cancelled=lambda c=cancelled: c))
            run(cluster)

    class AuthenticationError(Exception):
        pass

    def refuse(a):
        raise AuthenticationError(f"Unauthorized at {a}")

    run(FakeCluster(root), client=refuse)
    assert len(said) >= 8
    assert any("head:8265" in m for m in said)
    leaked = [m for m in said if secret in m or "admin:" in m]
    assert not leaked, leaked

"""Stages as Ray Jobs (tasks.jobs, tasks.stages): submission, re-attachment, read-back, errors,
partitions, timeouts and interruptions, against an in-memory stand-in for Ray's
JobSubmissionClient. The real Jobs API across hosts is tests/testbed's."""

from __future__ import annotations

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

    def get_job_logs(self, sid):
        self._net()
        return self.c.jobs[sid].logs

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


JOB = StageJob("train", "digits-abc-123", {"config": {"x": 1}})


def test_jobs_addresses():
    assert is_jobs_address("http://head:8265") and is_jobs_address("https://h:443")
    assert not is_jobs_address("ray://head:10001") and not is_jobs_address("head:6379")
    assert not is_jobs_address(None) and not is_jobs_address("")


def test_submit_follow_and_read_back(root):
    cluster = FakeCluster(root, succeed({"run_name": "r", "step": 10}))
    lines, progress = [], []
    out = runner(cluster, lines, progress=progress.append).run(JOB)
    assert out == {"run_name": "r", "step": 10}
    assert cluster.submitted == ["train-digits-abc-123"]
    req = json.loads((Path(job_dir(root, "train-digits-abc-123").path) / REQUEST).read_text())
    assert req["stage"] == "train" and req["args"] == {"config": {"x": 1}} and req["attempt"] == 1
    assert req["result"].endswith("/jobs/train-digits-abc-123/result.json")
    entry = cluster.jobs["train-digits-abc-123"].entrypoint
    assert entry.startswith("diffusion-pipeline job-run ") and entry.endswith("request.json")
    assert "step 5/10" in lines and "step 10/10" in lines  # the job's log, streamed
    assert progress == [0.5, 1.0]


def test_a_running_job_is_re_attached_not_submitted_again(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    cluster.jobs["train-digits-abc-123"] = FakeJob(status="RUNNING", logs="step 5/10\n")
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 1}
    assert cluster.submitted == []
    assert sum("re-attaching to Ray job train-digits-abc-123" in m for m in lines) == 1


def test_a_succeeded_job_is_read_back(root):
    cluster = FakeCluster(root)
    cluster.jobs["train-digits-abc-123"] = FakeJob(status="SUCCEEDED")
    where = Path(job_dir(root, "train-digits-abc-123").path)
    where.mkdir(parents=True)
    (where / RESULT).write_text('{"done": true}')
    assert runner(cluster, []).run(JOB) == {"done": True}
    assert cluster.submitted == []


def test_failed_and_stopped_attempts_are_resubmitted_with_a_suffix(root):
    cluster = FakeCluster(root, succeed({"ok": 3}))
    cluster.jobs["train-digits-abc-123"] = FakeJob(status="FAILED")
    cluster.jobs["train-digits-abc-123-a2"] = FakeJob(status="STOPPED")
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 3}
    assert cluster.submitted == ["train-digits-abc-123-a3"]
    req = json.loads((Path(job_dir(root, "train-digits-abc-123-a3").path) / REQUEST).read_text())
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
    assert "train-digits-abc-123" in text and "exit code 137" in text and "Killed (OOM)" in text


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
    assert cluster.submitted == ["train-digits-abc-123"]


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
    assert cluster.submitted == ["train-digits-abc-123"]
    assert _not_now(RuntimeError("Request failed with status code 503: Service Unavailable."))
    assert not _not_now(RuntimeError("Request failed with status code 500: bad runtime_env."))
    assert not _not_now(RuntimeError("Request failed with status code 400: try later"))


def test_a_long_partition_fails_as_transient_without_stopping_the_job(root):
    cluster = FakeCluster(root, succeed({"ok": 1}))
    cluster.jobs["train-digits-abc-123"] = FakeJob(status="RUNNING")
    cluster.down = 10**6
    with pytest.raises(errors.ClusterUnreachable, match="a rerun re-attaches") as e:
        runner(cluster, [], unreachable_s=0.05).run(JOB)
    assert isinstance(e.value, errors.TransientError)
    assert cluster.stopped == []


def test_a_stage_past_its_timeout_is_stopped(root):
    cluster = FakeCluster(root)  # the job runs forever
    cluster.jobs["train-digits-abc-123"] = FakeJob(
        status="RUNNING", start_time=int((time.time() - 100) * 1000))
    with pytest.raises(errors.StageTimeout, match="stage train ran past its timeout of 60 s"):
        runner(cluster, [], timeout_s=60).run(JOB)
    assert cluster.stopped == ["train-digits-abc-123"]


@pytest.mark.parametrize("cancelled", [False, True])
def test_an_interrupted_driver_stops_the_job_only_when_the_flow_run_is_cancelled(
        root, monkeypatch, cancelled):
    import tasks.jobs

    cluster = FakeCluster(root)
    cluster.jobs["train-digits-abc-123"] = FakeJob(status="RUNNING")

    def interrupt(self, sid):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeClient, "get_job_logs", interrupt)
    monkeypatch.setattr(tasks.jobs, "_flow_run_cancelling", lambda: cancelled)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner(cluster, lines).run(JOB)
    if cancelled:
        assert cluster.stopped == ["train-digits-abc-123"]
        assert any("flow run cancelled: stopped Ray job" in m for m in lines)
    else:
        assert cluster.stopped == []
        assert any("keeps running on the cluster" in m
                   and "ray job stop train-digits-abc-123" in m for m in lines)


def test_a_refused_token_is_explained(root):
    class AuthenticationError(Exception):
        pass

    def refuse(address):
        raise AuthenticationError("Unauthorized: Missing authentication token")

    r = JobRunner("http://head:8265", root, echo=lambda m: None, client=refuse)
    with pytest.raises(errors.ClusterAuthError, match="RAY_AUTH_MODE=token"):
        r.run(JOB)


def test_submission_ids_are_readable_and_safe():
    job = StageJob("evaluate", "models:/m/3 weird key", {})
    assert job.submission_id(1) == "evaluate-models-m-3-weird-key"
    assert job.submission_id(2) == "evaluate-models-m-3-weird-key-a2"


# -- tasks.stages and the job's entrypoint -------------------------------------------------------


def test_the_job_gets_no_ray_address_and_no_credential():
    from tasks.stages import for_job

    args = {"config": {"runtime": {"root": "s3://b/p", "ray_address": "http://h:8265",
                                   "mlflow_uri": None}, "train": {}}}
    out = for_job("train", args, "http://admin:s3cret@mlflow:5000")
    assert out["config"]["runtime"]["ray_address"] is None
    assert out["config"]["runtime"]["mlflow_uri"] == "http://mlflow:5000"
    assert "s3cret" not in json.dumps(out)
    pre = for_job("preprocess", {"data": {}, "runtime": {"ray_address": "http://h:8265"}}, None)
    assert pre["runtime"]["ray_address"] is None


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

    root = tmp_path / "root"
    config = PipelineConfig.model_validate({"runtime": {"root": str(root)}}).to_json_dict()
    where = tmp_path / "jobs" / "train-x"
    where.mkdir(parents=True)
    request = {"stage": "train", "key": "x", "attempt": 1, "args": {"config": config},
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


def test_a_long_log_is_fetched_less_often_and_its_end_always_arrives(root, monkeypatch):
    """The Jobs API returns the whole log each time: a 1 MB log is not re-read at every poll
    (8 s apart at 128 KiB/s), and the job's last lines still arrive when it ends."""
    from tasks.jobs import LOG_MAX_INTERVAL_S, log_interval

    assert log_interval(0, 2.0) == 2.0 and log_interval(2**20, 2.0) == 8.0
    assert log_interval(2**30, 2.0) == LOG_MAX_INTERVAL_S
    fetched = []

    def script(sid, job, cluster):
        if job.status == "PENDING":
            job.status, job.logs = "RUNNING", "x" * 2**20 + "\nstep 1/2\n"
        elif cluster.calls > 40:
            job.logs += "step 2/2\n"
            where = Path(job_dir(cluster.root, sid).path)
            where.mkdir(parents=True, exist_ok=True)
            (where / RESULT).write_text(json.dumps({"ok": 1}))
            job.status = "SUCCEEDED"

    cluster = FakeCluster(root, script)
    original = FakeClient.get_job_logs
    monkeypatch.setattr(FakeClient, "get_job_logs",
                        lambda self, sid: fetched.append(sid) or original(self, sid))
    lines: list[str] = []
    assert runner(cluster, lines).run(JOB) == {"ok": 1}
    assert len(fetched) <= 3  # not one per poll (about 20 polls)
    assert lines[-1] == "step 2/2" and "step 1/2" in lines


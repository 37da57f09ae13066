"""The pipeline as users deploy it, on the multi-host testbed (infra/testbed), with real faults.

A Prefect worker on the driver host runs the staging deployments; every Ray stage runs as a Ray
Job on the cluster (head + two worker hosts) through the Jobs API; the storage root and MLflow's
artifacts are on the S3 host; MLflow (basic auth) and Prefect have hosts of their own. Each test
asserts outcomes read back from the services themselves: the Jobs API's job list, the run's
record in S3, the registry's aliases, the flow run's state and logs.

The tests share one testbed and one deployed run (the ``deployed`` fixture: the committed
digits version and the promoted champion the other tests start from); each fault test trains a
run of its own (a different seed), so their jobs and runs are told apart by name. The storage
tests run the single-stage deployments, so an outage costs one stage, not a retrain.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from infra.testbed import (
    BUCKET,
    DEPLOYMENT,
    GENERATE_DEPLOYMENT,
    PREPROCESS_DEPLOYMENT,
    TRAIN_DEPLOYMENT,
    addr,
)
from tasks.datasets import DataConfig

PY = sys.executable
OPS = str(Path(__file__).with_name("ops.py"))
JOBS = f"http://{addr('head')}:8265"


# -- talking to the services from inside the testbed --------------------------------------------


def op(tb, host: str, *args: str, env: dict | None = None, timeout: float = 300):
    res = tb.run_on(host, [PY, OPS, *args], env=env, timeout=timeout)
    assert res.returncode == 0, f"{args} on {host}: {res.stdout[-2000:]}{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def prefect_env(tb) -> dict:
    """The Prefect client settings of the driver host, for a call from another host (the
    driver may be partitioned)."""
    d = tb.env_of("driver")
    return {k: d[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING") if k in d}


def deploy(tb, name: str, params: dict) -> str:
    return op(tb, "driver", "deploy", name, json.dumps(params))


def wait_run(tb, run_id: str, timeout: float = 600) -> dict:
    return op(tb, "prefect", "wait-flow-run", run_id, str(timeout), env=prefect_env(tb),
              timeout=timeout + 120)


def jobs(tb, prefix: str) -> list[dict]:
    return op(tb, "head", "jobs", JOBS, prefix)  # from the head: works while the driver is cut


def s3_json(tb, key: str):
    text = op(tb, "worker1", "s3-get", BUCKET, key)
    return None if text is None else json.loads(text)


def run_status(tb, run_name: str) -> dict:
    return s3_json(tb, f"pipeline/runs/{run_name}/_status.json") or {}


def wait_for(what: str, fn, timeout: float, every: float = 2.0):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if out:
            return out
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def running_train_job(tb, at_step: int = 1, timeout: float = 300) -> tuple[str, int]:
    """The one running train job once its log shows step ``at_step`` or later: (id, step)."""
    def look():
        found = op(tb, "head", "job-step", JOBS, "train-")
        return tuple(found) if found and found[1] >= at_step else None
    return wait_for(f"a train job at step {at_step}", look, timeout, every=1.0)


def flow_logs(tb, run_id: str) -> str:
    return "\n".join(op(tb, "prefect", "flow-run", run_id, env=prefect_env(tb))["logs"])


def committed_whole(tb, prefix: str) -> list[dict]:
    """The manifests under ``prefix``; each file a manifest lists exists."""
    found = op(tb, "worker1", "committed", BUCKET, prefix)
    for m in found:
        assert m["listed"] and not m["missing"], m
    return [m["manifest"] for m in found]


def train_params(seed: int, steps: int, **more: str) -> dict:
    sets = [f"train.seed={seed}", f"train.steps={steps}",
            *(f"{k}={v}" for k, v in more.items())]
    return {"overrides": sets}


def run_name_of(sid: str) -> str:
    """The run name in a train job's id, ``train-<run name>-<digest>[-a<attempt>]``."""
    return re.sub(r"-[0-9a-f]{12}(-a\d+)?$", "", sid.removeprefix("train-"))


# -- 1. a deployed run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(testbed) -> dict:
    """The staging retrain, deployed and run once: its flow run (state, logs). The fault tests
    start from what it leaves: a committed digits version and a promoted champion."""
    return wait_run(testbed, deploy(testbed, DEPLOYMENT, {}), timeout=900)


def test_a_deployed_run_trains_across_both_hosts_registers_promotes_and_samples(testbed,
                                                                                   deployed):
    out = deployed
    assert out["state"] == "COMPLETED", (out["message"], out["logs"][-40:])

    trains = jobs(testbed, "train-")
    assert len(trains) == 1 and trains[0]["status"] == "SUCCEEDED", trains
    status = run_status(testbed, run_name_of(trains[0]["id"]))
    assert status["status"] == "finished"
    assert (status["world_size"], status["nodes"]) == (2, 2), status  # DDP over both hosts
    assert [j["status"] for j in jobs(testbed, "preprocess-")] == ["SUCCEEDED"]
    assert [j["status"] for j in jobs(testbed, "evaluate-")] == ["SUCCEEDED"]
    assert [j["status"] for j in jobs(testbed, "generate-")] == ["SUCCEEDED"]

    assert op(testbed, "driver", "mlflow-alias", "digits-staging", "champion") == "1"
    (manifest,) = committed_whole(testbed, "pipeline/generations/")
    assert manifest["num_samples"] == 32 and manifest["model_version"] == "1"
    logs = "\n".join(out["logs"])
    assert "submitted Ray job train-" in logs and "step 100/100" in logs  # streamed into Prefect


# -- 2. driver loss, 3. a network partition and 4. a worker host lost, on one training job ------


def test_a_killed_driver_a_partition_and_a_lost_host_leave_one_job_at_the_exact_step(testbed,
                                                                                      deployed):
    """One training job meets three faults in turn, as they come at 3 a.m.:

    2. The driver host's Prefect worker and flow-run process are SIGKILLed while the job runs:
       the job runs on, and a new run of the deployment re-attaches to it.
    3. While that new run follows the job, the driver's link goes down for 60 s: the run says
       it waits, and once the link is back it follows the job to its end.
    4. During that partition one worker host's Ray processes are killed, and the host's node
       is started again: Ray Train restarts the worker group from the last checkpoint, losing
       at most one checkpoint interval, on both hosts again.

    In the end: one train job in the Jobs API, finished at exactly the configured step. One job
    serves all three faults because a training job's start is most of each one's cost; it is
    long enough (about 100 s of training on 2 cores) to still run after the re-attachment."""
    every = 250
    params = train_params(seed=2, steps=1000, **{"train.checkpoint_every": every})
    first = deploy(testbed, TRAIN_DEPLOYMENT, params)
    sid, _ = running_train_job(testbed, at_step=25)

    # 2. driver loss
    testbed.kill_driver()
    try:
        time.sleep(5)
        assert [j["status"] for j in jobs(testbed, sid)] == ["RUNNING"]  # it runs on
    finally:
        testbed.start_driver()
    second = deploy(testbed, TRAIN_DEPLOYMENT, params)
    wait_for("the new run to re-attach", lambda: f"re-attaching to Ray job {sid}" in flow_logs(
        testbed, second), 240)

    # 3. partition, and 4. a worker host lost meanwhile (after the first checkpoint)
    testbed.link_down("driver")
    cut = time.monotonic()
    try:
        _, killed_at = running_train_job(testbed, at_step=every + 10)
        testbed.kill_host_ray("worker2")
        time.sleep(10)
        testbed.restart_host_ray("worker2")
        time.sleep(max(0.0, 60 - (time.monotonic() - cut)))
        assert [j["status"] for j in jobs(testbed, sid)] in (["RUNNING"], ["SUCCEEDED"])
    finally:
        testbed.link_up("driver")
    out = wait_run(testbed, second, timeout=600)
    assert out["state"] == "COMPLETED", (out["message"], out["logs"][-40:])
    logs = "\n".join(out["logs"])
    assert f"submitted Ray job {sid}" not in logs  # 2: re-attached, never submitted again
    assert "does not answer" in logs  # 3: it said it was waiting
    assert [j["id"] for j in jobs(testbed, f"train-{run_name_of(sid)}")] == [sid]  # one job
    status = run_status(testbed, run_name_of(sid))
    assert (status["status"], status["step"], status["nodes"]) == ("finished", 1000, 2)
    resumed = status["resumed_from"]  # 4: Ray Train restarted the worker group from a checkpoint
    assert resumed > 0 and killed_at - resumed <= every + 25, (killed_at, resumed)
    assert first != second


def test_a_lost_head_is_resubmitted_and_the_run_resumes_from_its_checkpoint(testbed, deployed):
    """The head's Ray killed while a training job runs (after its first checkpoint), a fresh
    head started and the worker hosts rejoined: the job table is gone. The deployed run, still
    following, finds the job unknown and resubmits it as attempt 2 by itself (no person, no
    rerun), which resumes from the checkpoint and finishes at exactly the configured step."""
    every = 150
    params = train_params(seed=3, steps=600, **{"train.checkpoint_every": every})
    run_id = deploy(testbed, TRAIN_DEPLOYMENT, params)
    sid, killed_at = running_train_job(testbed, at_step=every + 10)
    testbed.kill_host_ray("head")
    try:
        time.sleep(5)
    finally:
        testbed.restart_host_ray("head", wait=False)
        # the worker hosts' raylets lost the head's GCS: they join the new head
        testbed.restart_host_ray("worker1", wait=False)
        testbed.restart_host_ray("worker2", wait=True)  # until all three nodes are alive
    out = wait_run(testbed, run_id, timeout=600)
    assert out["state"] == "COMPLETED", (out["message"], out["logs"][-40:])
    logs = "\n".join(out["logs"])
    assert f"Ray job {sid} disappeared from the cluster" in logs
    assert "resubmitting it as attempt 2" in logs
    assert [(j["id"], j["status"]) for j in jobs(testbed, f"train-{run_name_of(sid)}")] == [
        (f"{sid}-a2", "SUCCEEDED")]  # the new head knows only the resubmission
    status = run_status(testbed, run_name_of(sid))
    assert (status["status"], status["step"]) == ("finished", 600)
    assert every <= status["resumed_from"] <= killed_at + 25, (killed_at, status)


# -- 5. storage outage ---------------------------------------------------------------------------


def _completes_or_fails_cleanly_then_reruns(tb, deployment: str, run_id: str,
                                            params: dict) -> dict:
    out = wait_run(tb, run_id, timeout=600)
    if out["state"] != "COMPLETED":
        assert out["state"] == "FAILED", out
        # one clear line: the error's message, not a traceback
        assert out["message"] and "Traceback" not in out["message"], out["message"]
        out = wait_run(tb, deploy(tb, deployment, params), timeout=600)
    assert out["state"] == "COMPLETED", (out["message"], out["logs"][-40:])
    return out


def test_a_storage_outage_while_preprocessing_and_generating_commits_each_once(testbed,
                                                                               deployed):
    """S3 unreachable for 30 s while a new dataset version is preprocessed and, at the same
    time, a generation job samples from the champion (the single-stage deployments): each stage
    completes after bounded retries, or its run fails with one clear line and nothing
    half-committed and a rerun completes; either way exactly one new dataset version and one
    new generation are committed, whole."""
    datasets = len(committed_whole(testbed, "pipeline/datasets/digits/"))
    generations = len(committed_whole(testbed, "pipeline/generations/"))
    # a split no other run preprocesses, so the job has a new version to write (the default
    # split's version is committed already and its job would end at once, never overlapping)
    new_split = round(DataConfig().val_fraction + 0.05, 2)
    runs = {PREPROCESS_DEPLOYMENT: {"overrides": [f"data.val_fraction={new_split}"]},
            GENERATE_DEPLOYMENT: {"overrides": ["generate.num_samples=96", "generate.seed=5",
                                                "generate.shard_size=8"]}}
    ids = {name: deploy(testbed, name, params) for name, params in runs.items()}
    wait_for("a preprocess and a generate job running at once", lambda: {
        j["id"].split("-")[0] for j in jobs(testbed, "") if j["status"] == "RUNNING"
        and j["id"].startswith(("preprocess-", "generate-"))} == {"preprocess", "generate"},
        600, every=0.5)
    testbed.link_down("s3")
    try:
        time.sleep(30)
    finally:
        testbed.link_up("s3")
    for name, params in runs.items():
        _completes_or_fails_cleanly_then_reruns(testbed, name, ids[name], params)
    assert len(committed_whole(testbed, "pipeline/datasets/digits/")) == datasets + 1
    committed = committed_whole(testbed, "pipeline/generations/")
    assert len(committed) == generations + 1
    assert sorted(m["num_samples"] for m in committed)[-1] == 96


# -- cancelling a flow run -----------------------------------------------------------------------


def test_cancelling_a_flow_run_stops_its_ray_job(testbed, deployed):
    """A generation run cancelled in Prefect (as the UI's Cancel does) while its Ray job runs:
    the Prefect worker terminates the flow-run process, which stops the job on its way out
    instead of leaving it running on the cluster; the run ends Cancelled; nothing is
    committed. (A driver that dies without being cancelled leaves its job running, to be
    re-attached: the driver-loss test above.)"""
    generations = len(committed_whole(testbed, "pipeline/generations/"))
    run_id = deploy(testbed, GENERATE_DEPLOYMENT, {"overrides": [
        "generate.num_samples=100000", "generate.seed=11"]})  # minutes of sampling
    (job,) = wait_for("its generate job running", lambda: [
        j for j in jobs(testbed, "generate-") if j["status"] == "RUNNING"], 300, every=0.5)
    op(testbed, "prefect", "cancel-flow-run", run_id, env=prefect_env(testbed))
    out = wait_run(testbed, run_id, timeout=300)
    assert out["state"] == "CANCELLED", (out["state"], out["message"], out["logs"][-20:])
    wait_for(f"job {job['id']} stopped", lambda: [
        j["status"] for j in jobs(testbed, job["id"])] == ["STOPPED"], 60)
    assert f"flow run cancelled: stopped Ray job {job['id']}" in "\n".join(out["logs"])
    assert len(committed_whole(testbed, "pipeline/generations/")) == generations

"""What the end-to-end tests ask of the testbed's services, run *inside* a host with that
host's environment (``testbed.run_on(host, [python, ops.py, OP, ...])``): the test process
itself cannot reach the hosts' network. Each op prints one JSON line.

    jobs ADDRESS [PREFIX]            the Ray Jobs API's jobs (id, status, start), oldest first
    job-logs ADDRESS ID              one job's log
    job-step ADDRESS PREFIX          the newest running job's id and the last "step N/M" in its
                                     log (null if none runs)
    deploy NAME PARAMS_JSON          start a run of a deployment; its flow run id
    flow-run ID                      a flow run's state and its logs' messages
    wait-flow-run ID TIMEOUT         the flow run's state once final (or at the timeout)
    cancel-flow-run ID               cancel a flow run as the UI's Cancel does (state CANCELLING)
    s3-get BUCKET KEY                an object's text (null if missing)
    s3-ls BUCKET PREFIX              the keys under a prefix
    committed BUCKET PREFIX          the manifests under a prefix, each with the files it lists
                                     but the bucket lacks
    mlflow-alias MODEL ALIAS         the registered version an alias points at (null if none)
"""

from __future__ import annotations

import json
import sys
import time


def jobs(address: str, prefix: str = "") -> list[dict]:
    from ray.job_submission import JobSubmissionClient

    found = JobSubmissionClient(address).list_jobs()
    rows = [{"id": j.submission_id, "status": str(j.status.value), "start": j.start_time,
             "end": j.end_time}
            for j in found if j.submission_id and j.submission_id.startswith(prefix)]
    return sorted(rows, key=lambda r: r["start"] or 0)


def job_logs(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(sid)


def job_step(address: str, prefix: str) -> list | None:
    import re

    running = [j for j in jobs(address, prefix) if j["status"] == "RUNNING"]
    if not running:
        return None
    sid = running[-1]["id"]
    steps = [int(n) for n in re.findall(r"\bstep (\d+)/\d+", job_logs(address, sid))]
    return [sid, max(steps, default=0)]


def deploy(name: str, params: str) -> str:
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=json.loads(params), timeout=0)
    return str(run.id)


def flow_run(run_id: str) -> dict:
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as c:
        run = c.read_flow_run(run_id)
        # subflows (the stages under retrain) log under their own flow run ids
        subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(run_id)])))
        ids = [UUID(run_id), *(r.id for r in subs)]
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                           limit=200)
        offset = len(logs)
        while True:  # the API pages at 200
            more = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                               limit=200, offset=offset)
            if not more:
                break
            logs += more
            offset += len(more)
    return {"state": run.state.type.value if run.state else None,
            "name": run.state.name if run.state else None,
            "message": run.state.message if run.state else None,
            "logs": [entry.message for entry in sorted(logs, key=lambda x: x.timestamp)]}


def wait_flow_run(run_id: str, timeout: str) -> dict:
    from prefect import get_client

    deadline = time.monotonic() + float(timeout)
    with get_client(sync_client=True) as c:
        while True:
            state = c.read_flow_run(run_id).state
            if (state and state.is_final()) or time.monotonic() > deadline:
                break
            time.sleep(2)
    return flow_run(run_id)


def cancel_flow_run(run_id: str) -> str:
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as c:
        return c.set_flow_run_state(run_id, Cancelling()).status.value


def s3_get(bucket: str, key: str) -> str | None:
    import boto3

    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except Exception as e:
        if "NoSuchKey" in type(e).__name__ or "NoSuchKey" in str(e):
            return None
        raise


def s3_ls(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def committed(bucket: str, prefix: str) -> list[dict]:
    keys = set(s3_ls(bucket, prefix))
    found = []
    for key in sorted(k for k in keys if k.endswith("/_manifest.json")):
        m = json.loads(s3_get(bucket, key))
        base = key.rsplit("/", 1)[0] + "/"
        listed = [f["path"] for s in (m.get("splits") or {}).values() for f in s["files"]]
        listed += [sh["path"] for sh in m.get("shards", [])]
        found.append({"key": key, "manifest": m, "listed": len(listed),
                      "missing": [f for f in listed if base + f not in keys]})
    return found


def mlflow_alias(model: str, alias: str) -> str | None:
    from mlflow import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(model, alias).version)
    except Exception:
        return None


OPS = {"jobs": jobs, "job-logs": job_logs, "job-step": job_step, "deploy": deploy,
       "flow-run": flow_run, "wait-flow-run": wait_flow_run,
       "cancel-flow-run": cancel_flow_run, "s3-get": s3_get, "s3-ls": s3_ls,
       "committed": committed, "mlflow-alias": mlflow_alias}

if __name__ == "__main__":
    print(json.dumps(OPS[sys.argv[1]](*sys.argv[2:]), default=str))

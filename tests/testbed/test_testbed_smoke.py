"""Smoke test of the testbed (infra/testbed): each host does what the end-to-end tests rely on.

Everything is checked from inside a host with only that host's environment (``run_on``): the
test process itself cannot reach the hosts' network.
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from infra.testbed import BUCKET, DEPLOYMENTS, POOL, ROOT, TestbedError, addr

PY = sys.executable

# Runs on the cluster as a Ray Job: two tasks in a STRICT_SPREAD placement group (the shape of a
# two-worker training run) each write an object to S3 with nothing but their node's environment.
JOB = """
import json, os, sys
import boto3, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init()
pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)

@ray.remote(num_cpus=1)
def put(prefix, bucket):
    ip = ray.util.get_node_ip_address()
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{ip}", Body=ip.encode())
    return ip

ips = ray.get([put.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
               .remote(*sys.argv[1:3]) for i in range(2)])
print("WROTE", json.dumps(sorted(ips)))
"""

# Runs on the driver host: what the pipeline's flow run does with RAY_ADDRESS (the Jobs API).
SUBMIT = """
import json, os, shlex, sys, time, urllib.error, urllib.request
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes

address = os.environ["RAY_ADDRESS"]
try:  # the Jobs API refuses a client without the token
    urllib.request.urlopen(address + "/api/jobs/", timeout=10)
    anonymous = 200
except urllib.error.HTTPError as e:
    anonymous = e.code
# (after a host was lost and restarted the cluster also lists its dead node: not an error)
nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")],
                   raise_on_missing_output=False)
client = JobSubmissionClient(address)
job = client.submit_job(entrypoint=shlex.join(["python", "-c", *sys.argv[1:]]))
deadline = time.monotonic() + 240
while not (status := client.get_job_status(job)).is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
import boto3
listed = boto3.client("s3").list_objects_v2(Bucket=sys.argv[3], Prefix=sys.argv[2])
print(json.dumps({"anonymous": anonymous, "nodes": sorted(n.node_ip for n in nodes),
                  "status": str(status.value), "logs": client.get_job_logs(job),
                  "objects": sorted(o["Key"] for o in listed.get("Contents", []))}))
"""

# Runs on the driver host: MLflow refuses anonymous and wrong logins, takes the admin's, and
# stores artifacts through the server in S3 (the driver logs; the server writes the bucket).
MLFLOW = """
import base64, json, os, sys, tempfile, urllib.error, urllib.request
import boto3, mlflow

url = os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
def code(user, password):
    headers = {} if user is None else {"Authorization": "Basic " + base64.b64encode(
        f"{user}:{password}".encode()).decode()}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
codes = [code(None, None), code("admin", "wrong-password"),
         code(os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])]
mlflow.set_experiment(sys.argv[1])
with mlflow.start_run() as run:
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "hello.txt"), "w").write("hello")
        mlflow.log_artifact(os.path.join(d, "hello.txt"))
keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
    Bucket=sys.argv[2], Prefix="mlflow/").get("Contents", [])]
print(json.dumps({"codes": codes, "artifact_uri": run.info.artifact_uri,
                  "stored": [k for k in keys if run.info.run_id in k]}))
"""


def run_json(testbed, host: str, script: str, *args: str, timeout: float = 300) -> dict:
    res = testbed.run_on(host, [PY, "-c", script, *args], timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-3000:]}{res.stderr[-5000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_job_from_the_driver_runs_on_the_cluster_and_writes_to_s3(testbed):
    prefix = f"smoke/{uuid.uuid4().hex[:8]}"
    out = run_json(testbed, "driver", SUBMIT, JOB, prefix, BUCKET)
    assert out["anonymous"] == 401
    assert out["nodes"] == sorted(addr(h) for h in ("head", "worker1", "worker2"))
    assert out["status"] == "SUCCEEDED", out["logs"][-3000:]
    workers = sorted([addr("worker1"), addr("worker2")])
    assert f"WROTE {json.dumps(workers)}" in out["logs"]
    assert out["objects"] == [f"{prefix}/{ip}" for ip in workers]


def test_mlflow_needs_a_login_and_proxies_artifacts_to_s3(testbed):
    out = run_json(testbed, "driver", MLFLOW, f"smoke-{uuid.uuid4().hex[:8]}", BUCKET)
    assert out["codes"] == [401, 401, 200]
    assert out["artifact_uri"].startswith("mlflow-artifacts:/"), "proxied, not client-direct"
    assert len(out["stored"]) == 1 and out["stored"][0].endswith("/hello.txt")


def test_the_prefect_worker_is_online_and_the_staging_deployments_exist(testbed):
    assert testbed.probe("worker", POOL) == ["driver"]
    for name in DEPLOYMENTS:
        dep = testbed.probe("deployment", name)
        assert (dep["work_pool_name"], dep["root"]) == (POOL, ROOT), name


def test_each_host_gets_only_its_own_environment(testbed):
    driver, worker, s3 = (testbed.env_of(h) for h in ("driver", "worker1", "s3"))
    assert driver["RAY_ADDRESS"] == testbed.jobs_url and driver["PIPELINE_DIR"]
    assert worker["RAY_ADDRESS"] == f"{addr('head')}:6379"  # the GCS, as KubeRay's pods have it
    assert "PREFECT_API_URL" not in worker
    assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE"} <= set(worker)
    assert not any(k.startswith(("AWS_", "MLFLOW_", "RAY_")) for k in s3)
    res = testbed.run_on("worker1", ["env"], check=True)
    assert dict(line.split("=", 1) for line in res.stdout.splitlines()) == worker


def test_link_down_cuts_the_driver_off_and_link_up_restores_it(testbed):
    head = (addr("head"), "8265")
    testbed.probe("tcp", *head, timeout=10)
    testbed.link_down("driver")
    try:
        with pytest.raises(TestbedError, match=r"timed out|unreachable|No route"):
            testbed.probe("tcp", *head, timeout=3)
    finally:
        testbed.link_up("driver")
    testbed.probe("tcp", *head, timeout=30)

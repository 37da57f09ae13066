"""Readiness probes, run *inside* a testbed host with that host's environment only:

    python -m infra.testbed.probe CHECK [ARG...] [--timeout S]

Each check polls until it passes or the timeout ends, prints one JSON line (``ok``, ``detail``)
and exits 0 or 1. Endpoints and credentials come from the environment, as the pipeline's clients
take them (RAY_AUTH_TOKEN_PATH, AWS_*, MLFLOW_TRACKING_*, PREFECT_API_*), so a passing probe from
the driver host also shows that the driver's environment is complete. Standard library only,
plus boto3 for S3.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request


class NotYet(Exception):
    pass


def http(url: str, *, headers: dict | None = None, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        **({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        raise NotYet(f"{url}: {e}") from e


def basic(user_password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


def ray_token() -> str:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        with open(os.environ["RAY_AUTH_TOKEN_PATH"]) as f:
            token = f.read().strip()
    return token


def check_tcp(host: str, port: str) -> str:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as e:
        raise NotYet(f"{host}:{port}: {e}") from e
    return f"{host}:{port} accepts connections"


def check_ray(jobs_url: str, nodes: str) -> list[str]:
    """``nodes`` alive Ray nodes on as many distinct IPs, seen through the Jobs API host."""
    status, text = http(f"{jobs_url}/api/v0/nodes?limit=100",
                        headers={"Authorization": f"Bearer {ray_token()}"})
    if status != 200:
        raise NotYet(f"HTTP {status}: {text[:200]}")
    rows = json.loads(text)["data"]["result"]["result"]
    alive = sorted(r["node_ip"] for r in rows if r["state"] == "ALIVE")
    if len(set(alive)) != int(nodes) or len(alive) != int(nodes):
        raise NotYet(f"alive nodes: {alive}")
    return alive


def check_s3(bucket: str) -> str:
    """The bucket exists (created if missing) and lists."""
    import boto3
    import botocore.exceptions

    s3 = boto3.client("s3")
    try:
        if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=bucket)
        n = s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise NotYet(str(e)) from e
    return f"s3://{bucket} lists ({n} objects)"


def check_mlflow() -> str:
    """The server refuses a request without credentials and takes the environment's."""
    url = os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    anonymous, _ = http(url)
    user = os.environ["MLFLOW_TRACKING_USERNAME"] + ":" + os.environ["MLFLOW_TRACKING_PASSWORD"]
    logged_in, text = http(url, headers=basic(user))
    if (anonymous, logged_in) != (401, 200):
        raise NotYet(f"anonymous {anonymous}, logged in {logged_in}: {text[:200]}")
    return "anonymous 401, admin 200"


def prefect(path: str, body: dict | None = None) -> tuple[int, str]:
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    return http(os.environ["PREFECT_API_URL"] + path, headers=basic(auth) if auth else {},
                body=body)


def check_prefect() -> str:
    status, text = prefect("/health")
    if status != 200:
        raise NotYet(f"HTTP {status}: {text[:200]}")
    return "healthy"


def check_worker(pool: str, since: str = "0") -> list[str]:
    """A worker of ``pool`` is online (and sent a heartbeat after the epoch time ``since``)."""
    from datetime import datetime

    status, text = prefect(f"/work_pools/{pool}/workers/filter", body={})
    online = [w["name"] for w in json.loads(text) if w.get("status") == "ONLINE"
              and datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() > float(since)] \
        if status == 200 else []
    if not online:
        raise NotYet(f"HTTP {status}: no worker online: {text[:200]}")
    return online


def check_deployment(name: str) -> dict:
    """The deployment ``flow/name`` exists: its id, work pool and storage root."""
    status, text = prefect(f"/deployments/name/{name}")
    if status != 200:
        raise NotYet(f"HTTP {status}: {text[:200]}")
    dep = json.loads(text)
    root = dep["parameters"].get("config", {}).get("runtime", {}).get("root")
    return {"id": dep["id"], "work_pool_name": dep["work_pool_name"], "root": root}


CHECKS = {"tcp": check_tcp, "ray": check_ray, "s3": check_s3, "mlflow": check_mlflow,
          "prefect": check_prefect, "worker": check_worker, "deployment": check_deployment}


def main(argv: list[str]) -> int:
    timeout = 60.0
    if "--timeout" in argv:
        i = argv.index("--timeout")
        timeout = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    check, args = CHECKS[argv[0]], argv[1:]
    deadline = time.monotonic() + timeout
    while True:
        try:
            print(json.dumps({"ok": True, "detail": check(*args)}))
            return 0
        except NotYet as e:
            if time.monotonic() > deadline:
                print(json.dumps({"ok": False, "detail": str(e)}))
                return 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

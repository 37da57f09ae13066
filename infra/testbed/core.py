"""The testbed: seven hosts (network namespaces) running a Ray cluster, S3, MLflow and Prefect.

Hosts and what runs there (one long-running service per host, logged to ``logs/<host>.log``):

    head     198.51.100.11  ray start --head (GCS :6379, Jobs API/dashboard :8265), 0 CPUs
    worker1  198.51.100.12  ray start --address head:6379, 2 CPUs
    worker2  198.51.100.13  the same
    s3       198.51.100.21  moto_server :5000, bucket `testbed`
    mlflow   198.51.100.22  mlflow server --app-name basic-auth :5000, SQLite, artifacts proxied
                            to s3://testbed/mlflow
    prefect  198.51.100.23  prefect server start :4200 (auth string, SQLite)
    driver   198.51.100.31  prefect worker start --pool diffusion-staging (a process worker in
                            the checkout); the pool and the four staging deployments are
                            created from here

Each host's processes get an environment built here from nothing (:meth:`Testbed.env_of`), as a
real machine of the cluster would have it, and a HOME and TMPDIR of their own under the state
directory. The state directory (default ``/tmp/dpt-testbed``, or ``DPT_TESTBED_DIR``) holds the
logs, the generated secrets (Ray's auth token, MLflow's admin password, Prefect's auth string)
and ``state.json`` (addresses, pids, environments), mode 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from infra.testbed import netns

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv of the pipeline: ray, prefect, mlflow, moto_server
HOSTS = {"head": 11, "worker1": 12, "worker2": 13, "s3": 21, "mlflow": 22, "prefect": 23,
         "driver": 31}
RAY_HOSTS = ("head", "worker1", "worker2")
BUCKET = "testbed"
ROOT = f"s3://{BUCKET}/pipeline"
POOL = "diffusion-staging"
DEPLOYMENT = "retrain/retrain-staging"
TRAIN_DEPLOYMENT = "train/train-staging"
PREPROCESS_DEPLOYMENT = "preprocess/preprocess-staging"
GENERATE_DEPLOYMENT = "generate/generate-staging"
DEPLOYMENTS = (DEPLOYMENT, TRAIN_DEPLOYMENT, PREPROCESS_DEPLOYMENT, GENERATE_DEPLOYMENT)
GCS_PORT, JOBS_PORT, S3_PORT, MLFLOW_PORT, PREFECT_PORT = 6379, 8265, 5000, 5000, 4200
MLFLOW_ADMIN = "admin"


class TestbedError(RuntimeError):
    __test__ = False  # not a pytest test class


def unavailable_reason() -> str | None:
    """Why the testbed cannot run on this machine (it needs root and ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "the testbed needs root (it creates network namespaces with `ip netns`)"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2) on this machine"
    ns = "dpt-canary"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


def addr(host: str) -> str:
    return f"{netns.SUBNET}.{HOSTS[host]}"


def url(host: str, port: int) -> str:
    return f"http://{addr(host)}:{port}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Testbed:
    """``Testbed().up()`` builds everything; ``down()`` removes it. An instance made while the
    testbed runs (e.g. by another process) reads ``state.json`` and can do the rest."""

    __test__ = False  # not a pytest test class

    jobs_url = url("head", JOBS_PORT)
    s3_url = url("s3", S3_PORT)
    mlflow_url = url("mlflow", MLFLOW_PORT)
    prefect_api = url("prefect", PREFECT_PORT) + "/api"

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.dir = Path(state_dir or os.environ.get("DPT_TESTBED_DIR") or "/tmp/dpt-testbed")
        self.state_file = self.dir / "state.json"
        self.state: dict = json.loads(self.state_file.read_text()) \
            if self.state_file.exists() else {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- files and environments

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def _save(self) -> None:
        with self._lock:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.chmod(0o600)
            tmp.replace(self.state_file)

    def env_of(self, host: str) -> dict[str, str]:
        """The complete environment of processes on ``host`` (a copy)."""
        return dict(self.state["env"][host])

    def _environments(self) -> dict[str, dict[str, str]]:
        s = self.state["secrets"]
        token_path = self.dir / "secrets" / "ray_auth_token"
        token_path.write_text(s["ray_token"])
        token_path.chmod(0o600)

        def base(host: str) -> dict[str, str]:
            home = self.dir / "hosts" / host
            return {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
                    "HOME": str(home), "TMPDIR": str(home / "tmp"), "LANG": "C.UTF-8",
                    "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                    # the pipeline package, as the image has it installed
                    "PYTHONPATH": str(REPO)}

        aws = {"AWS_ENDPOINT_URL": self.s3_url, "AWS_ACCESS_KEY_ID": "testbed",
               "AWS_SECRET_ACCESS_KEY": s["s3_secret"], "AWS_DEFAULT_REGION": "us-east-1"}
        mlflow_client = {"MLFLOW_TRACKING_URI": self.mlflow_url,
                         "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                         "MLFLOW_TRACKING_PASSWORD": s["mlflow_password"]}
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
        # torch.distributed's Gloo picks its interface from the hostname, which every namespace
        # shares (it resolves to the machine's own address): name the host's link instead, as a
        # cluster with several NICs would (NCCL_SOCKET_IFNAME for GPUs).
        cluster = {**aws, **mlflow_client, **ray_auth, "RAY_USAGE_STATS_ENABLED": "0",
                   "GLOO_SOCKET_IFNAME": "eth0"}
        # RAY_ADDRESS on the Ray hosts, as KubeRay sets it in its pods: every process there
        # (Ray Train's own actors included) finds this cluster without scanning the machine's
        # processes, where it would also see other Ray instances (all namespaces share one
        # PID space) and fail with "Found multiple active Ray instances".
        env = {h: base(h) | cluster | {"RAY_ADDRESS": f"{addr('head')}:{GCS_PORT}"}
               for h in RAY_HOSTS}
        env["driver"] = base("driver") | cluster | {
            "RAY_ADDRESS": self.jobs_url, "PREFECT_API_URL": self.prefect_api,
            "PREFECT_API_AUTH_STRING": s["prefect_auth"], "PIPELINE_DIR": str(REPO),
            # the worker looks for scheduled runs every 2 s instead of 10: a deployment run
            # starts sooner (the tests start about fifteen)
            "PREFECT_WORKER_QUERY_SECONDS": "2"}
        env["s3"] = base("s3")
        env["mlflow"] = base("mlflow") | {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.dir / "secrets" / "mlflow_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": s["mlflow_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s["flask_secret"],
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI job runner: not used here
            **{k: v for k, v in aws.items() if k != "AWS_ENDPOINT_URL"}}
        env["prefect"] = base("prefect") | {
            "PREFECT_SERVER_API_AUTH_STRING": s["prefect_auth"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
        return env

    # ---------------------------------------------------------------- services

    def _argv(self, host: str) -> list[str]:
        home = self.dir / "hosts" / host
        ray_common = ["--block", "--node-ip-address", addr(host), "--temp-dir", str(home / "ray"),
                      "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
        if host == "head":
            # no CPUs: the head runs the GCS, the Jobs API and job entrypoints (0 CPUs each),
            # so Ray Train workers, tasks and actors all land on the worker hosts
            return ["ray", "start", "--head", "--port", str(GCS_PORT), "--num-cpus", "0",
                    "--dashboard-host", "0.0.0.0", "--dashboard-port", str(JOBS_PORT),
                    *ray_common]
        if host in RAY_HOSTS:
            return ["ray", "start", "--address", f"{addr('head')}:{GCS_PORT}", "--num-cpus", "2",
                    *ray_common]
        if host == "s3":
            return ["moto_server", "-H", "0.0.0.0", "-p", str(S3_PORT)]
        if host == "mlflow":
            a = addr("mlflow")
            return ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0",
                    "--port", str(MLFLOW_PORT), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
                    "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
                    "--allowed-hosts", f"{a},{a}:{MLFLOW_PORT}"]
        if host == "prefect":
            return ["prefect", "server", "start", "--host", "0.0.0.0", "--port", str(PREFECT_PORT)]
        if host == "driver":
            return ["prefect", "worker", "start", "--pool", POOL, "--type", "process",
                    "--name", "driver"]
        raise KeyError(host)

    def start(self, host: str) -> int:
        """Start the host's service (its log is appended to); returns its pid, which leads a
        session and process group of its own."""
        log = self.log(host)
        with log.open("ab") as f:
            f.write(f"\n==== {time.strftime('%H:%M:%S')} start {host}\n".encode())
        cwd = REPO if host == "driver" else self.dir / "hosts" / host
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.ns_name(host), *self._argv(host)], cwd=cwd,
            env=self.env_of(host), stdin=subprocess.DEVNULL, stdout=log.open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[host] = proc
        self.state["services"][host] = {"pid": proc.pid, "argv": self._argv(host),
                                        "log": str(log)}
        self._save()
        return proc.pid

    def running(self, host: str) -> bool:
        """Whether the host's service process (started by this or another process) runs."""
        if proc := self._procs.get(host):
            return proc.poll() is None
        svc = self.state.get("services", {}).get(host)
        return bool(svc) and _alive(svc["pid"])

    def stop(self, host: str) -> list[int]:
        """SIGKILL every process on the host (the service and all it spawned)."""
        killed = netns.kill_host(host)
        if proc := self._procs.pop(host, None):
            proc.wait()
        return killed

    def run_on(self, host: str, argv: list[str], env: dict | None = None,
               check: bool = False, timeout: float | None = None, capture: bool = True,
               **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` with the host's environment (plus ``env``), from the
        checkout; output is captured as text unless ``capture`` is false."""
        return subprocess.run(["ip", "netns", "exec", netns.ns_name(host), *argv],
                              env={**self.env_of(host), **(env or {})}, cwd=REPO,
                              capture_output=capture, text=True, check=check, timeout=timeout,
                              **kwargs)

    def probe(self, check: str, *args: str, host: str = "driver",
              timeout: float = 60) -> str | list:
        """Run a readiness check of :mod:`infra.testbed.probe` inside ``host`` until it passes;
        returns its detail or raises :class:`TestbedError`."""
        res = self.run_on(host, [sys.executable, "-m", "infra.testbed.probe", check, *args,
                                 "--timeout", str(timeout)], timeout=timeout + 60)
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            out = {"ok": False, "detail": (res.stdout + res.stderr)[-2000:]}
        if not out["ok"]:
            raise TestbedError(f"probe {check} {' '.join(args)} from {host}: {out['detail']}")
        return out["detail"]

    # ---------------------------------------------------------------- up / down / status

    def is_up(self) -> bool:
        return set(self.state.get("services", {})) == set(HOSTS) and all(map(self.running, HOSTS))

    def up(self, timeout: float = 300) -> list[tuple[str, float, str]]:
        """Build the testbed and wait until every service answers; returns the readiness rows
        (service, seconds after the start, detail). Already up: returns the recorded rows.
        Anything half-built (a crash, a failed start) is removed first; a failure removes
        everything again and raises :class:`TestbedError` with the tails of the logs."""
        if self.is_up():
            return self.state["ready"]
        self.down()
        try:
            return self._build(timeout)
        except BaseException as e:
            tails = self.log_tails()
            self.down()
            if isinstance(e, TestbedError):
                raise TestbedError(f"{e}\n\n{tails}") from None
            raise

    def _build(self, timeout: float) -> list[tuple[str, float, str]]:
        t0 = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ["logs", "secrets", *(f"hosts/{h}/tmp" for h in HOSTS)]:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.state = {
            "dir": str(self.dir), "services": {}, "ready": [],
            "hosts": {h: {"ip": addr(h), "netns": netns.ns_name(h), "veth": netns.ns_name(h)}
                      for h in HOSTS},
            "urls": {"jobs": self.jobs_url, "s3": self.s3_url, "mlflow": self.mlflow_url,
                     "prefect_api": self.prefect_api, "root": ROOT},
            "secrets": {"ray_token": secrets.token_hex(32), "s3_secret": secrets.token_hex(16),
                        "mlflow_password": secrets.token_urlsafe(18),
                        "prefect_auth": "admin:" + secrets.token_urlsafe(18),
                        "flask_secret": secrets.token_hex(16)}}
        (self.dir / "secrets" / "mlflow_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.dir}/hosts/mlflow/auth.db\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # as infra/docker/mlflow_entrypoint.py: a checked password is cached for a minute
            # instead of its scrypt hash being checked on every request (0.4 s each here)
            "auth_cache_ttl_seconds = 60\n")
        self.state["env"] = self._environments()
        self._save()
        netns.create({h: addr(h) for h in HOSTS})
        deadline = time.monotonic() + timeout
        # Ray first: `ray start` gives up when its node is not registered within 30 s, which a
        # loaded 2-core machine can miss; the Python servers start once the head runs.
        self.start("s3")
        self.start("head")
        head_up = threading.Event()

        def ray() -> str:
            try:
                self._ray_nodes(["head"], deadline)
            finally:
                head_up.set()
            for host in RAY_HOSTS[1:]:
                self.start(host)
            return " ".join(self._ray_nodes(RAY_HOSTS, deadline))

        def server(host: str, check: str):
            head_up.wait(timeout)
            self.start(host)
            return self.probe(check, timeout=timeout)

        def driver() -> str:
            self.probe("prefect", timeout=timeout)
            self.setup_prefect()
            self.start("driver")
            self.probe("deployment", DEPLOYMENT)
            return "online: " + " ".join(self.probe("worker", POOL, timeout=timeout))

        checks = {"s3": lambda: self.probe("s3", BUCKET, timeout=timeout),
                  "mlflow": lambda: server("mlflow", "mlflow"),
                  "prefect": lambda: server("prefect", "prefect"),
                  "ray": ray, "driver": driver}
        rows, errors = [], []

        def wait(name, fn):
            try:
                detail = fn()
                rows.append((name, round(time.monotonic() - t0, 1), str(detail)))
            except Exception as e:
                errors.append(f"{name}: {e}")

        threads = [threading.Thread(target=wait, args=item) for item in checks.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise TestbedError("testbed did not come up:\n" + "\n".join(errors))
        self.state["ready"] = sorted(rows, key=lambda r: r[1])
        self._save()
        return self.state["ready"]

    def _ray_nodes(self, hosts, deadline: float) -> list[str]:
        """Wait until exactly the Ray nodes of ``hosts`` are alive; start again a node whose
        ``ray start`` gave up (GCS too slow to answer on a loaded machine)."""
        while True:
            try:
                # from the head: the driver host may be cut off (a partition test)
                return self.probe("ray", self.jobs_url, str(len(hosts)), host="head",
                                  timeout=10)
            except TestbedError:
                if time.monotonic() > deadline:
                    raise
            for host in hosts:
                if not self.running(host):
                    self.start(host)

    def setup_prefect(self) -> None:
        """From the driver: create the process work pool and deploy the staging deployments
        (:data:`DEPLOYMENTS`)."""
        for argv in (["prefect", "work-pool", "create", POOL, "--type", "process"],
                     ["prefect", "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                      # -n FLOW/NAME would match the entrypoint's function name, not the flow's
                      *(a for d in DEPLOYMENTS for a in ("-n", d.split("/")[1]))]):
            res = self.run_on("driver", argv, timeout=300)
            with self.log("driver-setup").open("a") as f:
                f.write(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}\n")
            if res.returncode:
                raise TestbedError(f"{' '.join(argv)} failed ({res.returncode}): "
                                   f"{(res.stdout + res.stderr)[-1500:]}")

    def down(self) -> None:
        """Stop every service (SIGTERM to its process group, then SIGKILL to every process in
        the hosts) and delete the namespaces, veths and bridge. Safe to repeat, and after a
        crash (it looks at what exists, not only at the state file)."""
        pids = [s["pid"] for s in self.state.get("services", {}).values() if _alive(s["pid"])]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        netns.destroy()
        for proc in self._procs.values():
            proc.wait()
        self._procs.clear()
        self.state_file.unlink(missing_ok=True)  # logs stay for inspection; `up` clears them
        self.state = {}

    def status(self) -> list[dict]:
        """One row per host: address, service pid and whether it runs, link state."""
        rows = []
        for host in HOSTS:
            svc = self.state.get("services", {}).get(host, {})
            pid = svc.get("pid")
            rows.append({"host": host, "ip": addr(host), "pid": pid,
                         "running": self.running(host),
                         "processes": len(netns.pids_in(host)),
                         "link": netns.link_state(host)})
        return rows

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for path in sorted((self.dir / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ---------------------------------------------------------------- fault injection

    def link_down(self, host: str) -> None:
        """Unplug the host: its veth goes down, packets to and from it are lost."""
        netns.set_link(host, up=False)

    def link_up(self, host: str) -> None:
        netns.set_link(host, up=True)

    def kill_host_ray(self, host: str) -> list[int]:
        """SIGKILL all Ray processes of a Ray host (raylet, workers, ...), as a machine loss."""
        if host not in RAY_HOSTS:
            raise ValueError(f"{host} is not a Ray host ({', '.join(RAY_HOSTS)})")
        return self.stop(host)

    def restart_host_ray(self, host: str, wait: bool = True, timeout: float = 120) -> None:
        """Start the host's Ray node again (after :meth:`kill_host_ray`); ``wait``: until the
        cluster has three alive nodes again."""
        if host not in RAY_HOSTS:
            raise ValueError(f"{host} is not a Ray host ({', '.join(RAY_HOSTS)})")
        self.stop(host)
        self.start(host)
        if wait:
            self._ray_nodes(RAY_HOSTS, time.monotonic() + timeout)

    def kill_driver(self) -> list[int]:
        """SIGKILL the Prefect worker and every flow-run process it started (all processes on
        the driver host, including any :meth:`run_on` ones still running there)."""
        return self.stop("driver")

    def start_driver(self, wait: bool = True, timeout: float = 120) -> None:
        """Start the Prefect worker again; ``wait``: until it is online for the pool."""
        self.stop("driver")
        since = time.time()
        self.start("driver")
        if wait:
            self.probe("worker", POOL, str(since), timeout=timeout)

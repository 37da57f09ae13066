"""Shared pytest configuration: the test tiers, torch threads, and the real services.

Tiers. ``make test-fast`` runs ``-m "not integration and not slow"``; ``make test`` (CI) runs all.

- ``integration``: the test uses a real service: a local Ray, Prefect's API, an MLflow tracking
  store or server, an S3 server, or a process that starts one. A test that asks for one of the
  service fixtures below (directly or through another fixture) is marked so here, at collection;
  a test that starts a service without them (an ``mlflow server`` subprocess, a script that starts
  its own Ray) carries the mark itself. A test outside this tier that leaves a child process
  running (Ray and Prefect's server start some) fails, naming them, so a new test cannot land in
  the fast tier by mistake.
- ``slow``: needs no service but takes more than a few seconds (long sampler chains, the demo).
- ``gpu``: needs a CUDA device; skipped when none is present.

Torch threads. The tests without a service loop over many small tensor operations (1000-step
samplers, Markov chains, tiny training steps). On a 2-core machine with any other load, torch's
intra-op thread pool turns each small op into a contended barrier: measured 0.75 s
single-threaded against 24 s with 2 threads for the same test. So they run with one torch thread
(unless OMP_NUM_THREADS is set explicitly), and the previous setting is restored afterwards. The
integration tests keep torch's default, as the pipeline runs: float32 results of a batched
network differ in the last bits with the batch size, and how a uint8 pixel rounds may follow
(seen with one thread in test_evaluate.py::test_samples_do_not_depend_on_the_batch_size).
"""

from __future__ import annotations

import contextlib
import glob
import os

import pytest

# Fixtures that provide a real service; a test whose fixture closure holds one is `integration`.
SERVICE_FIXTURES = frozenset(
    {"ray_local", "s3_endpoint", "prefect_harness", "mlflow_store", "kill_session"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.integration)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)": state ppid pgrp session ...; None
    when the process is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:  # it ended while we looked
        return None


def _live(fields: list[str] | None) -> bool:
    return fields is not None and fields[0] not in ("Z", "X")  # not a zombie


def _live_children() -> set[int]:
    """This process's live child processes (empty where /proc does not list them)."""
    found = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as f:
            found.update(int(p) for p in f.read().split())
    return {pid for pid in found if _live(_stat(pid))}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


@pytest.fixture(autouse=True)
def _outside_integration_no_process_is_left_running(request):
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = _live_children()
    yield
    left = _live_children() - before
    if left:
        pytest.fail(
            "this test is not marked integration but left processes running (a test that starts "
            "Ray, Prefect's server or another service uses the fixture for it, or carries "
            "@pytest.mark.integration):\n"
            + "\n".join(f"  pid {pid}: {_cmdline(pid)}" for pid in sorted(left)),
            pytrace=False)


@pytest.fixture(autouse=True)
def _single_torch_thread(request):
    if "OMP_NUM_THREADS" in os.environ or request.node.get_closest_marker("integration"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _session_members(sid: int) -> list[int]:
    """Live processes in session ``sid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _live(fields := _stat(entry)) and int(fields[3]) == sid:
            found.append(int(entry))
    return found


@pytest.fixture
def kill_session():
    """``kill_session(proc)``: SIGKILL every process in the session that ``proc`` leads
    (started with ``start_new_session=True``) and wait until none is left.

    ``os.killpg`` is not enough for a process that started Ray: Ray puts each worker in a
    process group of its own, so its workers outlive the group kill and finish the task they
    were running — a generation shard or a checkpoint written *after* the test looked. The
    workers stay in the driver's session, so the session is what gets killed."""
    import signal
    import subprocess
    import time

    def kill(proc, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alive = _session_members(proc.pid)
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # retried until deadline
                    proc.wait(timeout=1)
            if not alive and proc.poll() is not None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {alive} of session {proc.pid} survived SIGKILL")
            time.sleep(0.1)

    return kill


# --------------------------------------------------------------------------------------------
# Real services for the pipeline tests: a local Ray, an S3-compatible server, Prefect's harness,
# an MLflow tracking store.
# --------------------------------------------------------------------------------------------

# Fake credentials for the loopback S3 server, set before any Ray worker starts so that workers
# inherit them. setdefault: a developer's own variables are left alone (the tests always pass
# the loopback endpoint explicitly, so nothing reaches AWS).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The `mlflow server`s the tests start skip MLflow's GenAI job runner (as the testbed's does):
# the pipeline never uses it, and its three huey consumers per server cost a 2-core machine CPU
# all through a test (seen: a basic-auth server not answering /health within 120 s under load).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# Ray Train's controller polls its workers every 2 s (its default): the end of a run and every
# checkpoint report wait for the next poll. The tests' runs last seconds, so they poll every
# 0.2 s: about 3 s less per training run (benchmarks/README.md, "Test suite"). The local Ray the
# tests start, and the CLI processes they run, inherit it; production keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback, as s3fs's own test suite runs it. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A fresh s3fs client against the loopback server, and a helper to make unique buckets."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)

    class S3:
        endpoint = s3_endpoint
        client = fs

        @staticmethod
        def bucket() -> str:
            name = f"b-{uuid.uuid4().hex[:12]}"
            fs.mkdir(name)
            return name

    return S3


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary API server and database for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A temporary MLflow tracking store on SQLite, one per test module (its tests use their own
    model names): ``{"uri", "dir", "locks"}``, the last a lease directory for promotions."""
    d = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{d}/mlflow.db", "dir": d, "locks": str(d / "locks")}

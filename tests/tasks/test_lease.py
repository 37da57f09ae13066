"""The exclusive lease: one holder at a time, locally and on S3; stale leases are broken, live
ones are kept alive by their refresh."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tasks.errors import LeaseBusy
from tasks.lease import Lease
from tests.helpers import Occupancy, run_together


def test_one_holder_at_a_time_and_released_on_exit(tmp_path):
    occupancy = Occupancy()

    def work(_):
        with Lease(str(tmp_path), "m", stale_s=30, wait_s=10), occupancy.hold(0.2):
            pass

    run_together(work, range(4))
    assert occupancy.most == 1 and occupancy.entries == 4
    assert not list(tmp_path.iterdir())


def test_a_busy_lease_names_its_holder_and_a_stale_one_is_broken(tmp_path):
    with (Lease(str(tmp_path), "m", stale_s=30, wait_s=1),
          pytest.raises(LeaseBusy, match=r"m\.lock is held by .* pid \d+"),
          Lease(str(tmp_path), "m", stale_s=30, wait_s=0.3)):
        pass
    (tmp_path / "m.lock").write_text(json.dumps({"token": "x", "host": "h", "pid": 1, "at": 0}))
    with Lease(str(tmp_path), "m", stale_s=30, wait_s=1) as lease:
        assert lease.holder()["token"] == lease.token


def test_a_live_holder_refreshes_past_the_stale_age(tmp_path):
    with Lease(str(tmp_path), "m", stale_s=0.4, wait_s=1):
        time.sleep(1.0)  # longer than stale_s: only the refresh keeps it
        with pytest.raises(LeaseBusy), Lease(str(tmp_path), "m", stale_s=0.4, wait_s=0.5):
            pass
    assert not (Path(tmp_path) / "m.lock").exists()


def test_exclusive_on_s3(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    url = f"s3://{s3.bucket()}/registry/locks"
    with (Lease(url, "m", stale_s=30, wait_s=1), pytest.raises(LeaseBusy),
          Lease(url, "m", stale_s=30, wait_s=0.3)):
        pass
    with Lease(url, "m", stale_s=30, wait_s=1):
        pass
    assert not s3.client.exists(url.split("://")[1] + "/m.lock")


def test_a_holder_on_this_host_whose_process_is_gone_is_broken_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    (tmp_path / "m.lock").write_text(json.dumps(
        {"token": "x", "host": socket.gethostname(), "pid": dead.pid, "at": time.time()}))
    # wait_s=0: taken only if the dead holder's lease is broken at the first look
    with Lease(str(tmp_path), "m", stale_s=600, wait_s=0) as lease:
        assert lease.holder()["token"] == lease.token
    # a live holder elsewhere (another host's pid cannot be checked) is waited for
    (tmp_path / "m.lock").write_text(json.dumps(
        {"token": "y", "host": "elsewhere", "pid": dead.pid, "at": time.time()}))
    with pytest.raises(LeaseBusy), Lease(str(tmp_path), "m", stale_s=600, wait_s=0.3):
        pass


def test_on_s3_with_the_configured_endpoint_not_the_environment(s3, monkeypatch):
    """runtime.s3_endpoint_url reaches the lease through ``options`` (with no AWS_ENDPOINT_URL
    set, the default options would address AWS itself)."""
    from tasks.runtime import RuntimeConfig
    from tasks.storage import storage_options

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    url = f"s3://{s3.bucket()}/runs/r"
    options = storage_options(url, RuntimeConfig(s3_endpoint_url=s3.endpoint))
    with Lease(url, "_training", stale_s=30, wait_s=1, options=options):
        assert s3.client.exists(url.split("://")[1] + "/_training.lock")
    assert not s3.client.exists(url.split("://")[1] + "/_training.lock")

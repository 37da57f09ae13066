"""The exclusive lease: one holder at a time, locally and on S3; stale leases are broken (age in
the store's time), once, by one breaker; live ones are kept alive by their refresh; a holder
that lost its lease knows it, and the fencing check refuses it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tasks.errors import LeaseBusy
from tasks.lease import Lease
from tests.helpers import Occupancy, run_together


def holders_in_turn(d: Path, n: int, *, wait_s: float, hold_s: float) -> Occupancy:
    """``n`` threads taking the lease ``m`` in ``d`` at once, each holding it ``hold_s``."""
    occupancy = Occupancy()

    def work(_):
        with Lease(str(d), "m", stale_s=30, wait_s=wait_s), occupancy.hold(hold_s):
            pass

    run_together(work, range(n))
    return occupancy


def test_one_holder_at_a_time_and_released_on_exit(tmp_path):
    occupancy = holders_in_turn(tmp_path, 4, wait_s=10, hold_s=0.2)
    assert occupancy.most == 1 and occupancy.entries == 4
    assert not list(tmp_path.iterdir())


def test_a_busy_lease_names_its_holder_and_a_stale_one_is_broken(tmp_path):
    with (Lease(str(tmp_path), "m", stale_s=30, wait_s=1),
          pytest.raises(LeaseBusy, match=r"m\.lock is held by .* pid \d+"),
          Lease(str(tmp_path), "m", stale_s=30, wait_s=0.3)):
        pass
    stale_lock(tmp_path, age=60)
    with Lease(str(tmp_path), "m", stale_s=30, wait_s=1) as lease:
        assert lease.holder()["token"] == lease.token


def stale_lock(d: Path, age: float, at: float | None = None) -> Path:
    """A lock of another host's holder whose file the store last wrote ``age`` seconds ago
    (its own ``at`` claims ``at``: a clock that disagrees)."""
    lock = d / "m.lock"
    lock.write_text(json.dumps({"token": "x", "host": "h", "pid": 1,
                                "at": time.time() if at is None else at}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_staleness_is_the_stores_time_not_the_holders_clock(tmp_path):
    """A holder whose clock runs an hour behind wrote ``at`` an hour ago, but the store wrote
    its lock just now: it is live. One whose clock runs ahead, with a lock the store wrote a
    minute ago, is stale."""
    stale_lock(tmp_path, age=0, at=time.time() - 3600)
    with pytest.raises(LeaseBusy, match=r"refreshed [0-9] s ago"), \
            Lease(str(tmp_path), "m", stale_s=30, wait_s=0.2):
        pass
    stale_lock(tmp_path, age=60, at=time.time() + 3600)
    with Lease(str(tmp_path), "m", stale_s=30, wait_s=0.2) as lease:
        assert lease.holder()["token"] == lease.token


def test_many_waiters_breaking_one_stale_lease_give_one_holder_at_a_time(tmp_path, caplog):
    """Eight processes' worth of waiters find the same stale lease at once: one breaks it (its
    break marker is created only if absent), and from then on they hold it one at a time."""
    stale_lock(tmp_path, age=60)
    occupancy = holders_in_turn(tmp_path, 8, wait_s=20, hold_s=0.05)
    assert occupancy.most == 1 and occupancy.entries == 8
    assert sum("breaking the stale lease" in r.getMessage() for r in caplog.records) == 1
    assert {p.name for p in tmp_path.iterdir()} == {"m.lock.x.break"}  # the marker stays


def test_a_holder_whose_lease_was_taken_knows_it_and_is_fenced(tmp_path):
    """The lock replaced under a holder (it was broken while the holder was cut off): the
    holder's refresh finds it out, the fencing check refuses it, its refresh never overwrites
    the new lock, and its exit leaves the new holder's lock alone. A holder whose heartbeat is
    older than half the stale age is refused by the check too."""
    from tasks.lease import check_held

    with Lease(str(tmp_path), "m", stale_s=0.4, wait_s=1) as lease:
        assert lease.check() is None
        assert check_held(str(tmp_path), "m", lease.token, stale_s=0.4) is None
        (tmp_path / "m.lock").unlink()
        (tmp_path / "m.lock").write_text(json.dumps({"token": "new", "host": "h2", "pid": 7}))
        time.sleep(0.5)
        assert lease.lost and "now held by h2 pid 7" in lease.lost
        assert "now held by h2 pid 7" in check_held(str(tmp_path), "m", lease.token,
                                                    stale_s=0.4)
    assert json.loads((tmp_path / "m.lock").read_text())["token"] == "new"
    (tmp_path / "m.lock").unlink()

    lease = Lease(str(tmp_path), "m", stale_s=30, wait_s=1)
    with lease:
        beat = next(tmp_path.glob("m.lock.*.beat"))
        os.utime(beat, (time.time() - 20, time.time() - 20))  # its refreshes did not land
        assert "last refreshed 20 s ago" in check_held(str(tmp_path), "m", lease.token,
                                                       stale_s=30)


def fence_raced(d: Path, a: Lease, meanwhile) -> str | None:
    """``a``'s fence (from another process, as a training worker checks it) with ``meanwhile()``
    run right after the fence's first read of the lock: the reads of one check interleaved with
    another process's break."""
    checker = Lease(str(d), "m", stale_s=a.stale_s, wait_s=0, token=a.token)
    first = checker.holder

    def holder():
        doc = first()
        if checker.holder is holder:  # once
            del checker.holder
            meanwhile()
        return doc

    checker.holder = holder
    return checker.check()


def test_the_fence_judges_only_its_own_heartbeat_against_a_break_in_between(tmp_path):
    """A's heartbeat stopped landing (A was cut off); between the fence's read of the lock (A's
    still) and its look at the heartbeat, B breaks A's stale lease. The fence must refuse A:
    B's fresh lock is no sign of A's life, and neither is a lock nobody holds; nor is a heartbeat
    A's refresh wrote just after the break, once the lock is B's."""
    def cut_off(a: Lease) -> None:
        beat = tmp_path / f"m.lock.{a.token}.beat"
        os.utime(beat, (time.time() - 60, time.time() - 60))

    def b_breaks_and_takes(a: Lease, then=None):
        def go():
            cut_off(a)
            b = Lease(str(tmp_path), "m", stale_s=30, wait_s=1)
            b.__enter__()
            taken.append(b)
            if then:
                then(b)
        return go

    taken: list[Lease] = []
    # stale_s=30: A's own refresh (every 7.5 s) stays out of the way
    with Lease(str(tmp_path), "m", stale_s=30, wait_s=1) as a:
        assert fence_raced(tmp_path, a, lambda: None) is None  # no break: A holds it, fresh
        reason = fence_raced(tmp_path, a, b_breaks_and_takes(a))
        assert reason and "now held by" in reason
        taken.pop().__exit__(None, None, None)
    assert not (tmp_path / "m.lock").exists()

    with Lease(str(tmp_path), "m", stale_s=30, wait_s=1) as a:  # broken, then released
        reason = fence_raced(tmp_path, a, b_breaks_and_takes(
            a, then=lambda b: (taken.pop(), b.__exit__(None, None, None))))
        assert reason and "m.lock" in reason
    for p in tmp_path.iterdir():
        p.unlink()

    with Lease(str(tmp_path), "m", stale_s=30, wait_s=1) as a:  # A's late beat after the break
        reason = fence_raced(tmp_path, a, b_breaks_and_takes(a, then=lambda b: a._beat()))
        assert reason and "now held by" in reason
        taken.pop().__exit__(None, None, None)


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

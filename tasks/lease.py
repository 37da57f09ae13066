"""An exclusive lease on storage: a lock file that only one process at a time can hold.

Used where a read-modify-write of shared state has no atomic primitive of its own (MLflow has no
compare-and-set on aliases or tags, so promotions serialise through this). The lease is a small
JSON file ``{"token", "host", "pid", "at"}`` published with :func:`tasks.storage.commit_bytes`,
which creates it only if it does not exist (hard link locally, ``If-None-Match: *`` on S3): of
two processes racing for it, exactly one wins. While held, a thread rewrites ``at`` every
``stale_s / 4`` seconds; a lease whose ``at`` is older than ``stale_s`` belongs to a process
that died, and the next taker breaks it with a warning. A holder on this same host whose
process no longer exists is known dead and is broken at once (a crashed run restarted on the
same machine does not wait out ``stale_s``). Waiters poll with a capped backoff and give up after
``wait_s`` with :class:`LeaseBusy` naming the holder.

Limits, by design: breaking a stale lease is check-then-delete (two waiters breaking the same
stale lease at the same instant could both win), so ``stale_s`` must be far longer than any
pause of a live holder; clocks of the machines involved must roughly agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from tasks.errors import LeaseBusy
from tasks.storage import (
    Location,
    atomic_write_bytes,
    call,
    commit_bytes,
    read_json,
    storage_options,
)

log = logging.getLogger(__name__)


def _gone_from_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (a pid cannot be checked elsewhere;
    a reused pid only makes this miss, and then ``stale_s`` still applies)."""
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    if holder.get("host") != socket.gethostname() or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists under another user
        return False
    return False


class Lease:
    """``with Lease(dir, name, stale_s=..., wait_s=...):`` holds ``<dir>/<name>.lock``.

    ``options``: the fsspec options for ``dir`` (:func:`tasks.storage.storage_options` of the
    runtime config, e.g. its S3 endpoint); default: those the environment gives."""

    def __init__(self, directory: str, name: str, *, stale_s: float, wait_s: float,
                 options: dict | None = None):
        base = Location.of(directory,
                           storage_options(directory) if options is None else options)
        self.loc = base.child(re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".lock")
        self.stale_s, self.wait_s = stale_s, wait_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "at": time.time()}).encode()

    def holder(self) -> dict | None:
        """The current lease document (None when nobody holds it)."""
        try:
            return read_json(self.loc)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"at": 0.0}  # unreadable: commit_bytes never publishes that; break it

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while not commit_bytes(self.loc, self._payload()):
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            age = time.time() - float(holder.get("at", 0.0))
            gone = _gone_from_here(holder)
            if age > self.stale_s or gone:
                log.warning("breaking the %s lease %s (held by %s pid %s, %s)",
                            "dead holder's" if gone else "stale", self.loc.describe(),
                            holder.get("host"), holder.get("pid"),
                            "a process that no longer exists" if gone
                            else f"not refreshed for {age:.0f} s")
                if (self.holder() or {}).get("token") == holder.get("token"):
                    with contextlib.suppress(FileNotFoundError):
                        call(self.loc, self.loc.fs.rm, self.loc.path)
                continue
            if time.monotonic() > deadline:
                raise LeaseBusy(
                    f"the lease {self.loc.describe()} is held by {holder.get('host')} pid "
                    f"{holder.get('pid')} (refreshed {age:.0f} s ago); retry later (a lease is "
                    f"broken after {self.stale_s:.0f} s without refresh)")
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="lease-refresh")
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(max(self.stale_s / 4, 0.05)):
            if (self.holder() or {}).get("token") != self.token:
                log.warning("the lease %s was broken while held", self.loc.describe())
                return
            with contextlib.suppress(Exception):  # a missed refresh is retried next period
                atomic_write_bytes(self.loc, self._payload())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self.holder() or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                call(self.loc, self.loc.fs.rm, self.loc.path)
        else:
            log.warning("the lease %s was broken while held", self.loc.describe())

"""An exclusive lease on storage: a lock file that only one process at a time can hold.

Used where a read-modify-write of shared state has no atomic primitive of its own (MLflow has no
compare-and-set on aliases or tags, so promotions serialise through this), and to keep one
driver per training run. The files, in the lease's directory, for a lease named ``m``:

- ``m.lock``: ``{"token", "host", "pid", "at"}``, created only if absent
  (:func:`tasks.storage.commit_bytes`: a hard link locally, ``If-None-Match: *`` on S3): of two
  processes racing for it, exactly one wins. Never rewritten while it exists.
- ``m.lock.<token>.beat``: the holder's heartbeat, rewritten every ``stale_s / 4`` seconds by the
  holder alone (so a refresh can never overwrite somebody else's lock).
- ``m.lock.<token>.break``: created only if absent by the one process that breaks the lease of
  ``<token>``; two waiters breaking the same stale lease at once cannot both delete a lock.

**Staleness is measured in the store's own time**: the age of a lease is the modification time
the store gives a probe object written now, minus that of the holder's heartbeat (or of the lock,
before its first beat), so the clocks of the hosts involved do not matter. A lease older than
``stale_s`` belongs to a process that died or lost the store, and the next taker breaks it with a
warning. A holder on this same host whose process no longer exists is known dead and is broken
at once (a crashed run restarted on the same machine does not wait out ``stale_s``). Waiters poll
with a capped backoff and give up after ``wait_s`` with :class:`LeaseBusy` naming the holder.

**Fencing**: a holder that cannot refresh, or whose lease was broken, learns it at its next
refresh (:attr:`Lease.lost`). Work that must not be done twice asks :func:`check_held` (or
:meth:`Lease.check`) right before each write: it fails unless the lock holds this token, then
*this token's own* heartbeat is younger than ``stale_s / 2`` in store time, then the lock still
holds this token. Nobody can break the lease (as stale) for at least another ``stale_s / 2``
after a check passes: **the margin**. A write must therefore *follow the check at once and finish
within ``stale_s / 2``*; nothing slow (an MLflow call with its retries, an evaluation) may sit
between the check and the write, so a sequence of writes checks before each one (training checks
right before it uploads each checkpoint, :mod:`tasks.train.worker`; the registry before every
write of a promotion or rollback, :mod:`tasks.registry.promotion`).

What is left, by design: the breaker re-reads the lock before deleting it, and a holder deletes
its lock on release only after reading its own token there; a lease that was stale for
``stale_s`` and is released in the same instant as it is broken could lose a third process's
fresh lock in between (that process then finds its lease lost at its first refresh).
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
from datetime import datetime

from tasks.errors import LeaseBusy, StorageError
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


def _mtime(loc: Location) -> float:
    """``loc``'s modification time as the store records it (seconds since the epoch)."""
    with contextlib.suppress(Exception):
        loc.fs.invalidate_cache(loc.path)
    info = call(loc, loc.fs.info, loc.path)
    t = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(t, datetime):
        return t.timestamp()
    if t is None:
        raise StorageError(f"the store gives no modification time for {loc.describe()}")
    return float(t)


def _remove(loc: Location) -> None:
    """Remove ``loc`` if it is there; best effort (a leftover is harmless and cleaned later)."""
    with contextlib.suppress(Exception):
        call(loc, loc.fs.rm, loc.path)


def _store_now(probe: Location) -> float:
    """The store's time now: the modification time of ``probe``, written and removed here."""
    atomic_write_bytes(probe, b"now")
    try:
        return _mtime(probe)
    finally:
        _remove(probe)


class Lease:
    """``with Lease(dir, name, stale_s=..., wait_s=...):`` holds ``<dir>/<name>.lock``.

    ``options``: the fsspec options for ``dir`` (:func:`tasks.storage.storage_options` of the
    runtime config, e.g. its S3 endpoint); default: those the environment gives. ``token``: the
    identity of a holder (default: a new one); :func:`check_held` takes it to check a lease held
    by another process (the training driver's, from a worker)."""

    def __init__(self, directory: str, name: str, *, stale_s: float, wait_s: float,
                 options: dict | None = None, token: str | None = None):
        self.base = Location.of(directory,
                                storage_options(directory) if options is None else options)
        self.stem = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".lock"
        self.loc = self.base.child(self.stem)
        self.stale_s, self.wait_s = stale_s, wait_s
        self.token = token or uuid.uuid4().hex
        self.lost: str | None = None  # why this holder lost the lease while holding it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _aux(self, token: str, kind: str) -> Location:
        return self.base.child(f"{self.stem}.{token}.{kind}")

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
            return {}  # unreadable: commit_bytes never publishes that; its age decides

    def _now(self) -> float:
        """The store's time now, from a probe of this token's (unique: a worker checks the lease
        under its driver's token)."""
        return _store_now(self._aux(self.token, f"now-{uuid.uuid4().hex[:8]}"))

    def lost_to(self, holder: dict | None) -> str | None:
        """None when ``holder`` (the current lease document) is this token's; else who has the
        lease now."""
        if (holder or {}).get("token") == self.token:
            return None
        if holder:
            return (f"the lease {self.loc.describe()} is now held by {holder.get('host')} pid "
                    f"{holder.get('pid')}")
        return f"the lease {self.loc.describe()} was broken"

    def age(self, holder: dict) -> float:
        """Seconds, in the store's time, since ``holder`` last showed life (its last heartbeat,
        or taking the lock)."""
        now = self._now()
        try:
            seen = _mtime(self._aux(str(holder.get("token")), "beat"))
        except FileNotFoundError:
            try:
                seen = _mtime(self.loc)
            except FileNotFoundError:
                return 0.0  # released meanwhile: the next attempt takes it
        return max(0.0, now - seen)

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while not commit_bytes(self.loc, self._payload()):
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            gone = _gone_from_here(holder)
            age = 0.0 if gone else self.age(holder)
            if gone or age > self.stale_s:
                self._break(holder, "a process that no longer exists" if gone
                            else f"not refreshed for {age:.0f} s", gone)
                continue
            if time.monotonic() > deadline:
                raise LeaseBusy(
                    f"the lease {self.loc.describe()} is held by {holder.get('host')} pid "
                    f"{holder.get('pid')} (refreshed {age:.0f} s ago); retry later (a lease is "
                    f"broken after {self.stale_s:.0f} s without refresh)")
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        self._beat()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="lease-refresh")
        self._thread.start()
        return self

    def _break(self, holder: dict, why: str, gone: bool) -> None:
        """Delete ``holder``'s lock if this process is the one to break it (its break marker,
        created only if absent, decides); a marker left by a breaker that died before deleting
        the lock is removed once it is itself stale."""
        token = str(holder.get("token"))
        marker = self._aux(token, "break")
        if not commit_bytes(marker, self._payload()):
            with contextlib.suppress(FileNotFoundError):
                if self._now() - _mtime(marker) > self.stale_s:
                    _remove(marker)
            time.sleep(0.05)
            return
        log.warning("breaking the %s lease %s (held by %s pid %s, %s)",
                    "dead holder's" if gone else "stale", self.loc.describe(),
                    holder.get("host"), holder.get("pid"), why)
        if str((self.holder() or {}).get("token")) == token:
            with contextlib.suppress(FileNotFoundError):
                call(self.loc, self.loc.fs.rm, self.loc.path)
        _remove(self._aux(token, "beat"))

    def _beat(self) -> None:
        atomic_write_bytes(self._aux(self.token, "beat"), self._payload())

    def _refresh(self) -> None:
        while not self._stop.wait(max(self.stale_s / 4, 0.05)):
            try:
                holder = self.holder()
            except Exception:  # the store unreachable: retried next period
                continue
            lost = self.lost_to(holder)
            if lost:
                self.lost = lost
                log.warning("%s (this process held it)", lost)
                return
            with contextlib.suppress(Exception):  # a missed refresh is retried next period
                self._beat()

    def check(self) -> str | None:
        """None while this token holds the lease with a heartbeat of its own younger than
        ``stale_s / 2`` in store time; else why not (see the module's fencing).

        Only this token's heartbeat is evidence of life: not the lock's modification time
        (:meth:`age`'s fallback for a waiter, which after a break is the *new* holder's fresh
        lock) and not a missing file. The reads, in order: the lock (this token's), the
        heartbeat, the lock again (still this token's: a break between the two reads, or a
        heartbeat the refresh rewrote just after a break it had not seen yet, is not taken for
        life), then the store's time, so the age covers the whole check."""
        if self.lost:
            return self.lost
        lost = self.lost_to(self.holder())
        if lost:
            return lost
        try:
            seen = _mtime(self._aux(self.token, "beat"))
        except FileNotFoundError:  # removed by the process that broke the lease: name it
            return self.lost_to(self.holder()) or (
                f"the lease {self.loc.describe()} has no heartbeat of this holder's (another "
                f"process broke it)")
        lost = self.lost_to(self.holder())
        if lost:
            return lost
        age = max(0.0, self._now() - seen)
        if age > self.stale_s / 2:
            return (f"the lease {self.loc.describe()} was last refreshed {age:.0f} s ago (the "
                    f"store's time), over half of the {self.stale_s:.0f} s after which another "
                    f"process may break it")
        return None

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and not self.lost_to(self.holder()):
            with contextlib.suppress(FileNotFoundError):
                call(self.loc, self.loc.fs.rm, self.loc.path)
        else:
            log.warning("the lease %s was broken while held", self.loc.describe())
        _remove(self._aux(self.token, "beat"))


def check_held(directory: str, name: str, token: str, *, stale_s: float,
               options: dict | None = None) -> str | None:
    """:meth:`Lease.check` for the holder ``token`` from any process: None while it holds the
    lease, fresh; else why not."""
    return Lease(directory, name, stale_s=stale_s, wait_s=0, options=options,
                 token=token).check()

"""Fault injection for the fault-tolerance tests: every fault the tests can ask for, in one place.

Two ways in, because the stages' processes are reached differently:

- ``DIFFUSION_PIPELINE_FAULT=<point>`` (an environment variable, inherited by the preprocessing
  and generation stages' processes): the process that reaches ``maybe_die(<point>)`` dies at once
  with SIGKILL, as a node loss or an OOM kill would. Unset (the default) it costs one dictionary
  lookup.
- a training job's ``fault`` (``tasks.train.driver``'s ``fault=``, shipped to the Ray Train
  workers in their job, which environment variables do not reach): ``"kill@N"``,
  ``"nan@N"`` or ``"lease@N"``. :func:`training_faults` turns it into the training loop's one
  hook, called with each step's batch; without a ``fault`` the hook is the identity.

Nothing else reads either.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

ENV = "DIFFUSION_PIPELINE_FAULT"
TRAINING_FAULTS = ("kill", "nan", "lease")


def maybe_die(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def training_faults(job: dict, rank: int, marker_dir: str) -> Callable[[int, Any], Any]:
    """The training loop's fault hook ``at(step, x) -> x``, called before step ``step``
    (counted from 1) with its batch ``x``, from the job's ``fault`` ``"<kind>@N"``:

    - ``kill@N``: rank 0 SIGKILLs itself at step N, once (a marker file in ``marker_dir``
      keeps the resumed attempt alive);
    - ``nan@N``: every rank's batch at step N is NaN, so the loss is (the divergence path);
    - ``lease@N``: rank 0 replaces the run's training-lease lock by another driver's at step N,
      as if that driver had broken this one's lease (:func:`take_lease_elsewhere`).
    """
    spec = job.get("fault")
    if not spec:
        return lambda step, x: x
    kind, _, at = str(spec).partition("@")
    if kind not in TRAINING_FAULTS or not at.isdigit() or int(at) < 1:
        raise ValueError(f"fault must be <kind>@<step> with kind one of "
                         f"{', '.join(TRAINING_FAULTS)} and step >= 1, got {spec!r}")
    at_step = int(at)

    def at(step: int, x: Any) -> Any:
        if step != at_step:
            return x
        if kind == "nan":
            return x * float("nan")
        if kind == "lease" and rank == 0:
            take_lease_elsewhere(job["lease"], job["storage_options"])
        if kind == "kill" and rank == 0:
            marker = os.path.join(marker_dir, f".fault-kill-{at_step}")
            if not os.path.exists(marker):
                os.makedirs(marker_dir, exist_ok=True)
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return x

    return at


def take_lease_elsewhere(lease: dict, storage_options: dict) -> None:
    """The training lease's lock (``lease``: its ``dir`` and ``name``) replaced by another
    driver's, as if that driver had broken this one's lease."""
    from tasks.storage import Location, atomic_write_bytes

    lock = Location.of(lease["dir"], storage_options).child(f"{lease['name']}.lock")
    atomic_write_bytes(lock, json.dumps({"token": "another-driver", "host": "elsewhere",
                                         "pid": 1}).encode())

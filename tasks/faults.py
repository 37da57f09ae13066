"""Fault injection for the fault-tolerance tests.

``DIFFUSION_PIPELINE_FAULT=<point>`` makes the process that reaches ``<point>`` die at once
with SIGKILL, as a node loss or an OOM kill would. Nothing else reads this variable; unset (the
default) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DIFFUSION_PIPELINE_FAULT"


def maybe_die(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)

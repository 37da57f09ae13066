"""A stage's progress in the Prefect UI while it runs: one progress artifact per task run, fed
from the stage's Ray Job (training steps, generated samples)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class ProgressArtifact:
    """Callable with a fraction (0-1): creates the task run's progress artifact on the first
    call and updates it at most every ``every_s`` seconds (and at 100 %). A Prefect API that
    refuses is logged once and otherwise ignored: progress must never fail a stage."""

    def __init__(self, description: str, every_s: float = 5.0):
        self.description = description
        self.every_s = every_s
        self.artifact_id = None
        self.last_t = 0.0
        self.failed = False

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if self.failed or (now - self.last_t < self.every_s and fraction < 1.0):
            return
        self.last_t = now
        pct = round(100.0 * fraction, 1)
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=pct,
                                                            description=self.description)
            else:
                update_progress_artifact(self.artifact_id, pct)
        except Exception as e:  # pragma: no cover - depends on the API's mood
            self.failed = True
            log.warning("progress artifact not updated (%s); the stage goes on", e)

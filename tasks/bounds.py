"""What every number in the pipeline config obeys, in one place.

- **Finite.** Every section's model config is :data:`SECTION` (pydantic's
  ``allow_inf_nan=False``), so NaN and ±infinity are refused at load, naming the key: a NaN
  passes every comparison-based check (``v > nan`` is False, so a NaN gate threshold passes every
  model) and infinity passes ``> 0``. The math package's dataclasses (``model``,
  ``diffusion``) say the same in their ``__pydantic_config__``.
- **Seconds** (timeouts, waits): positive and at most :data:`MAX_SECONDS`, a year. Python's
  ``signal.setitimer``, which bounds a stage run in-process, overflows past 2**63 ns (about 292
  years; ``1e12`` raises OverflowError) and no wait here is meant to run longer than a year.
- **Seeds**: integers in [0, 2**32), which torch's and numpy's generators take as they are.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

SECTION = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

MAX_SECONDS = 365 * 24 * 3600
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]

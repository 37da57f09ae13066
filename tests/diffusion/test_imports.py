"""`diffusion` is the math only: importing it pulls in none of the orchestration stack."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("prefect", "ray", "mlflow", "pyarrow", "fsspec", "s3fs", "PIL")

PROBE = """
import json, sys
import diffusion
import diffusion.{modules}
roots = sorted({{name.split(".")[0] for name in sys.modules}})
print(json.dumps(roots))
"""

MODULES = (
    "schedules",
    "forward",
    "parameterization",
    "losses",
    "likelihood",
    "denoiser",
    "noise",
    "samplers",
    "metrics",
    "fidelity",
    "training",
    "unet",
    "ema",
    "serialization",
)


def test_importing_diffusion_keeps_the_orchestration_stack_out():
    # A fresh interpreter: this test process may already have imported anything.
    code = PROBE.format(modules=", diffusion.".join(MODULES))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "diffusion" in loaded and "torch" in loaded
    assert not loaded & set(FORBIDDEN), f"diffusion imported {sorted(loaded & set(FORBIDDEN))}"

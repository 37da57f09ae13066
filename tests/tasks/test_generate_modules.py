"""The generation package's shape: its public names import from ``tasks.generate``, and the
module every sampler actor imports loads none of the driver's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER_ONLY = ("tasks.generate.driver", "tasks.generate.resolve", "tasks.models",
               "tasks.registry", "tasks.tracking", "prefect", "mlflow")


def _modules_after(statement: str) -> set[str]:
    """sys.modules after ``statement`` in a fresh interpreter (this one may hold anything)."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_sampler_actor_module_loads_no_driver_code():
    loaded = _modules_after("import tasks.generate.worker")
    assert "tasks.generate.worker" in loaded
    assert not {m for m in loaded if m.split(".")[0] in DRIVER_ONLY or m in DRIVER_ONLY}


def test_every_public_name_imports_from_the_package():
    import tasks.generate as tg

    for name in tg.__all__:
        obj = getattr(tg, name)
        assert obj is getattr(sys.modules[f"tasks.generate.{tg._HOMES[name]}"], name), name

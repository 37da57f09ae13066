"""`diffusion-pipeline generate` against a registered model under Prefect's test harness: the
default model is the registry's champion, the sampler is the registered default, and sample i
equals what the registered pyfunc returns for (seed, index i, label i)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.generate import read_samples
from tasks.registry import RegistryConfig, promote, register_model
from tasks.runtime import RuntimeConfig
from tests.helpers import DEFAULTS, evaluation, invoke, lineage, save_tiny_model


def test_cli_generate_from_the_champion(ray_local, prefect_harness, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--root", str(tmp_path), "--set", "generate.num_samples=12",
            "--set", "generate.shard_size=5", "--set", "generate.batch_size=4"]

    none = invoke(["generate", *args])
    assert none.exit_code == 1 and "no registered model named 'digits-diffusion'" in none.output

    model_dir = save_tiny_model(tmp_path / "m", seed=0)
    reg = register_model(str(model_dir), tracking_uri=uri, run_id=None, cfg=RegistryConfig(),
                         model_name="digits-diffusion", evaluation=evaluation(3.0, fd_floor=3.0),
                         lineage=lineage(), defaults=DEFAULTS)
    promote("digits-diffusion", reg["version"], tracking_uri=uri, cfg=RegistryConfig(),
            lock_dir=str(tmp_path / "locks"))

    res = invoke(["generate", *args])
    assert res.exit_code == 0, res.output
    assert "(3 shard(s) written): 12 samples of models:/digits-diffusion@champion with ddim:4" \
        in res.output
    manifest = next(tmp_path.glob("generations/*/_manifest.json"))
    assert f"manifest: {manifest}" in res.output
    again = invoke(["generate", *args])
    assert again.exit_code == 0 and "(already complete, reused)" in again.output

    x, y, m = read_samples(str(manifest.parent), RuntimeConfig(root=str(tmp_path)))
    assert m["model_version"] == "1" and m["guidance_scale"] == DEFAULTS["guidance_scale"]
    # the registered pyfunc gives the same image for (seed 0, index i, label y_i)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/digits-diffusion@champion")
        out = pyfunc.predict(pd.DataFrame({"seed": [0, 0], "index": [3, 11],
                                           "label": [int(y[3]), int(y[11])]}))
    finally:
        mlflow.set_tracking_uri(None)
    from tasks.pyfunc_model import decode_pixels

    for row, i in zip(out.to_dict("records"), (3, 11), strict=True):
        assert np.array_equal(decode_pixels(row), x[i])

    bad = invoke(["generate", *args, "--set", "generate.steps=1000"])
    assert bad.exit_code == 1 and "between 1 and T=100" in bad.output

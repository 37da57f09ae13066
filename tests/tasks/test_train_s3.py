"""Training and evaluation with the storage root on an S3-compatible server (moto, loopback):
dataset, checkpoints and the run status live in the bucket; resume and evaluation read them
back from it."""

from __future__ import annotations

import pytest

from flows.config import load_config
from tasks.evaluate import EvalConfig, evaluate
from tasks.preprocess import preprocess
from tasks.train import finished_run, run_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "train.batch_size=16", "train.warmup_steps=2",
    "train.checkpoint_every=4", "train.log_every=4", "diffusion.T=50",
]


def test_train_resume_and_evaluate_on_s3(ray_local, s3, tmp_path):
    bucket = s3.bucket()
    sets = [*TINY, f"runtime.s3_endpoint_url={s3.endpoint}",
            f"runtime.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", "train.run_name=s3run"]
    cfg = load_config(sets=[*sets, "train.steps=4"], root=f"s3://{bucket}/pipe")
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)

    first = run_training(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime,
                         echo=lambda s: None)
    assert first.checkpoint_uri.startswith(f"s3://{bucket}/pipe/runs/s3run/checkpoint_")
    assert s3.client.exists(first.checkpoint_uri.removeprefix("s3://") + "/state.json")
    # MLflow artifacts beside the SQLite database, not in ./mlruns of the working directory
    assert (tmp_path / "mlartifacts").is_dir()

    # a longer run of the same name resumes from the checkpoint in the bucket
    cfg = load_config(sets=[*sets, "train.steps=8"], root=f"s3://{bucket}/pipe")
    res = run_training(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime,
                       echo=lambda s: None)
    assert res.metrics["step"] == 8 and res.metrics["resumed_from"] == 4
    found = finished_run(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime)
    assert found["checkpoint_uri"] == res.checkpoint_uri

    ev = evaluate(res.checkpoint_uri, cfg.data,
                  EvalConfig(num_samples=20, frontier=["ddim:5"], nll_images=4,
                             reference_steps=20), cfg.runtime, echo=lambda s: None)
    assert ev["stored_at"].startswith(f"s3://{bucket}/pipe/evaluations/")
    assert ev["metrics"]["fd"] > 0 and ev["default_sampler"] == {"name": "ddim", "steps": 5}

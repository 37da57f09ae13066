"""Training with the storage root on an S3-compatible server (moto, loopback): dataset,
checkpoints and the run status live in the bucket; a longer run of the same name resumes from
them. (Evaluation with its store in the bucket: tests/flows/test_retrain_flow.py.)"""

from __future__ import annotations

from flows.config import load_config
from tasks.preprocess import preprocess
from tasks.train import finished_run, run_training
from tests.helpers import TINY_UNET

TINY = [*TINY_UNET, "train.batch_size=16", "train.warmup_steps=2", "train.checkpoint_every=4",
        "train.log_every=4", "diffusion.T=50"]


def test_train_and_resume_on_s3(ray_local, s3, tmp_path):
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

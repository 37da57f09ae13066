"""Training with the storage root on an S3-compatible server (moto, loopback): dataset,
checkpoints and the run status live in the bucket, and the same config finds the finished run
there. (A killed run resuming from its checkpoint in the bucket, and evaluation with its store in
the bucket: tests/flows/test_retrain_flow.py.)"""

from __future__ import annotations

from flows.config import load_config
from tasks.preprocess import preprocess
from tasks.train import finished_run, run_training
from tests.helpers import TINY_UNET

TINY = [*TINY_UNET, "train.batch_size=16", "train.warmup_steps=2", "train.checkpoint_every=4",
        "train.log_every=4", "diffusion.T=50"]


def test_train_on_s3_and_find_the_finished_run(ray_local, s3, tmp_path):
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

    # the same config finds the finished run in the bucket. (A run resumed from its checkpoint
    # in the bucket after its driver was killed: tests/flows/test_retrain_flow.py.)
    found = finished_run(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime)
    assert found["checkpoint_uri"] == first.checkpoint_uri

"""The training stage on a local Ray: TorchTrainer, checkpoints, resume, faults, bad config
(its checks against the dataset, one by one: test_train_units.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.serialization import build_unet
from flows.config import load_config
from tasks.checkpoints import verify
from tasks.errors import DatasetNotFound, TrainConfigError, TrainingDiverged, TrainingLeaseLost
from tasks.train import run_training
from tests.helpers import TINY_UNET

REPO = Path(__file__).resolve().parents[2]

TINY = [*TINY_UNET, "train.batch_size=16", "train.warmup_steps=2", "train.checkpoint_every=4",
        "train.log_every=4", "diffusion.T=100"]


def cfg_for(root, *sets):
    return load_config(sets=[*TINY, *sets], root=str(root))


def train(cfg, **kw):
    return run_training(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime,
                        pipeline=cfg.to_json_dict(), echo=lambda s: None, **kw)


def test_trains_checkpoints_and_a_rerun_is_a_no_op(digits_root):
    cfg = cfg_for(digits_root, "train.steps=8", "train.sample_every=8")
    res = train(cfg)
    m = res.metrics
    assert m["status"] == "finished" and m["step"] == 8 and m["resumed_from"] == 0
    assert {"loss", "lr", "grad_norm", "images_per_s", "loss_q1", "loss_q4"} <= set(m)
    ck = Path(res.checkpoint_uri)
    state = verify(ck)
    assert state["step"] == 8 and state["dataset"]["name"] == "digits"
    assert state["config"]["train"]["steps"] == 8 and state["run_name"] == res.run_name
    model = build_unet(ck / "model")  # the EMA weights, verified, no pickle
    assert model.config.num_classes == 10 and model.config.base_channels == 8
    assert ck.parent == digits_root / "runs" / res.run_name

    # MLflow (SQLite under the root): params, metric curves from rank 0, the sample grid
    from mlflow import MlflowClient

    assert res.mlflow_uri == f"sqlite:///{digits_root}/mlflow.db"
    client = MlflowClient(res.mlflow_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == res.run_name
    assert run.data.params["train.steps"] == "8" and run.data.params["model.base_channels"] == "8"
    assert run.data.tags["dataset.version"] == state["dataset"]["version"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 8]
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert arts == ["samples/step0000008.png"]
    logged = json.loads(Path(client.download_artifacts(run.info.run_id,
                                                       "dataset/_manifest.json")).read_text())
    assert logged["version"] == state["dataset"]["version"]

    again = train(cfg)  # same config → same run name → already finished: no Ray, no training
    assert again.reused and not res.reused
    assert again.run_name == res.run_name and again.metrics == res.metrics
    assert again.checkpoint_uri == res.checkpoint_uri
    assert again.mlflow_run_id == res.mlflow_run_id


def test_a_small_split_read_on_the_driver_has_the_rows_of_the_ray_data_read(digits_root):
    """Small splits are decoded on the driver (no Ray Data tasks); the rows, their order and
    the column types are those of the streaming Ray Data read used for large ones."""
    import numpy as np
    from ray.data.dataset import MaterializedDataset

    from tasks.datasets import open_dataset
    from tasks.storage import Location
    from tasks.train.data import _blocks, build_dataset

    root = Location.of(str(digits_root))
    _, manifest = open_dataset(root, "digits")
    small = build_dataset(root, manifest)
    streamed = build_dataset(root, manifest, materialize_below_bytes=0)
    assert isinstance(small, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset)

    def rows(ds):
        got = [b for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        return np.concatenate([b["x"] for b in got]), np.concatenate([b["label"] for b in got])

    (xa, ya), (xb, yb) = rows(small), rows(streamed)
    assert xa.dtype == xb.dtype == np.uint8 and ya.dtype == yb.dtype == np.int64
    assert xa.shape == xb.shape == (manifest["splits"]["train"]["rows"], *manifest["shape"])
    order = np.lexsort(xb.reshape(len(xb), -1).T)  # Ray Data may reorder blocks
    assert np.array_equal(np.sort(ya), np.sort(yb))
    assert np.array_equal(xa[np.lexsort(xa.reshape(len(xa), -1).T)], xb[order])
    parts = _blocks(xa, ya, rows_per_block=100)  # blocks keep the row order
    assert [len(t) for t in parts][:2] == [100, 100] and sum(map(len, parts)) == len(xa)
    # training reads the train split only, never the val or the locked test rows: both reads
    # hold exactly the images of the train side of the key hash
    from tasks.digits import digits_splits

    splits = digits_splits()
    assert len(splits["test"][0]) > 0 and manifest["splits"]["test"]["rows"] == len(
        splits["test"][0])
    want = splits["train"][0]
    assert np.array_equal(xb[order], want[np.lexsort(want.reshape(len(want), -1).T)])


def test_a_run_being_trained_elsewhere_is_refused_naming_its_holder(digits_root, monkeypatch):
    """One driver per training run: the run's lease is held by a live process (here, this
    one's lease object), so a second driver waits LEASE_WAIT_S and fails before Ray or MLflow.
    (A holder that died on this host is broken at once: the kill-and-rerun tests.)"""
    import tasks.train.driver
    from tasks import tracking
    from tasks.errors import TrainingBusy
    from tasks.lease import Lease

    cfg = cfg_for(digits_root, "train.steps=8", "train.run_name=busy")
    monkeypatch.setattr(tasks.train.driver, "LEASE_WAIT_S", 0.5)
    run_dir = digits_root / "runs" / "busy"
    with (Lease(str(run_dir), "_training", stale_s=120, wait_s=1),
          pytest.raises(TrainingBusy, match=r"training run busy is being trained by another "
                        r"process: the lease .*_training\.lock is held by .* pid \d+")):
        train(cfg)
    assert not list(run_dir.glob("checkpoint_*")) and not (run_dir / "_training.lock").exists()
    assert tracking.find_run(f"sqlite:///{digits_root}/mlflow.db", "busy") is None


def test_a_worker_killed_mid_run_resumes_to_the_weights_of_an_uninterrupted_run(digits_root):
    """The Ray Train worker SIGKILLed at step 6 of 8: FailureConfig restarts it from the step-4
    checkpoint, and the run ends with the weights of the same config trained without a break
    (the first test's run: a reuse here), since step n's rows and noise depend on (seed, n,
    rank) alone (tasks/train/order.py). Where the testbed runs, tests/testbed shows the
    recovery with DDP on separate hosts (a worker host lost mid-training)."""
    import safetensors.torch

    from tasks.checkpoints import TRAINING_FILE

    plain = train(cfg_for(digits_root, "train.steps=8", "train.sample_every=8"))
    res = train(cfg_for(digits_root, "train.steps=8", "train.sample_every=8",
                        "train.run_name=killed"), fault="kill@6")
    assert res.metrics["step"] == 8 and res.metrics["status"] == "finished"
    assert res.metrics["resumed_from"] == 4  # lost at most one checkpoint interval
    assert (digits_root / "runs" / "killed" / ".fault-kill-6").exists()
    a, b = (safetensors.torch.load_file(Path(r.checkpoint_uri) / TRAINING_FILE)
            for r in (plain, res))
    weights = [k for k in a if k.startswith(("model.", "ema."))]
    assert weights and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in weights)
    # bit for bit, in fact: the EMA weights' file has the same digest
    assert verify(Path(plain.checkpoint_uri))["sha256"]["model/model.safetensors"] == \
        verify(Path(res.checkpoint_uri))["sha256"]["model/model.safetensors"]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The step of each checkpoint in ``run_dir``, oldest first (each one verified)."""
    return [verify(c)["step"] for c in sorted(p for p in run_dir.glob("checkpoint_*")
                                              if p.is_dir())]


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(digits_root):
    cfg = cfg_for(digits_root, "train.steps=12", "train.run_name=nan")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6 .*last good checkpoint is "
                                               r"step 4"):
        train(cfg, fault="nan@6")
    assert checkpoint_steps(digits_root / "runs" / "nan") == [4]


def test_a_driver_that_lost_its_lease_writes_no_more_checkpoints(digits_root):
    """Another driver takes the run's training lease at step 6 of 12 (as it may once this
    driver's refreshes have failed for LEASE_STALE_S): at the step-8 checkpoint rank 0 finds
    the lock is not its driver's, every rank stops without writing, and the driver fails naming
    the new holder, leaving the run's lock and status to it."""
    cfg = cfg_for(digits_root, "train.steps=12", "train.run_name=fenced")
    with pytest.raises(TrainingLeaseLost, match=r"training run fenced stopped: the lease "
                       r".*_training\.lock is now held by elsewhere pid 1; no checkpoint"):
        train(cfg, fault="lease@6")
    run_dir = digits_root / "runs" / "fenced"
    assert checkpoint_steps(run_dir) == [4]
    assert json.loads((run_dir / "_training.lock").read_text())["token"] == "another-driver"
    assert not (run_dir / "_status.json").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.resolution=16"], "model.resolution=16 does not match"),
        (["data.version=0123456789abcdef"], "no committed version '0123456789abcdef'"),
    ],
)
def test_bad_config_fails_before_any_worker_starts(digits_root, sets, message):
    from tasks import tracking

    cfg = cfg_for(digits_root, "train.run_name=bad", *sets)
    lines = []
    with pytest.raises((TrainConfigError, DatasetNotFound), match=re.escape(message)):
        run_training(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime,
                     pipeline=cfg.to_json_dict(), echo=lines.append)
    # refused before the run began: nothing reported, no MLflow run (made before Ray Train
    # starts), no run directory
    assert lines == []
    assert tracking.find_run(f"sqlite:///{digits_root}/mlflow.db", "bad") is None
    assert not (digits_root / "runs" / "bad").exists()


def test_a_reused_run_name_with_another_model_is_refused(digits_root):
    """A run named explicitly, finished with one model: the same train.run_name with another
    model is refused in one line naming the difference, by the finished-run lookup (before,
    it returned the old checkpoint as this config's model) and by training (before, it
    crash-looped restoring weights of another shape). A longer run of the same model (only
    train.steps raised) is the same run."""
    from tasks.checkpoints import STATE_FILE
    from tasks.train import finished_run
    from tasks.train.config import run_identity

    a = cfg_for(digits_root, "train.run_name=named", "train.steps=4")
    run = digits_root / "runs" / "named"
    (run / "checkpoint_0001").mkdir(parents=True)
    (run / "checkpoint_0001" / STATE_FILE).write_text(json.dumps(
        {"step": 4, "run_identity": run_identity(a.model, a.diffusion, a.train)}))
    (run / "_status.json").write_text(json.dumps({"status": "finished", "step": 4}))
    assert finished_run(a.data, a.model, a.diffusion, a.train, a.runtime)["checkpoint_uri"] \
        .endswith("checkpoint_0001")

    b = cfg_for(digits_root, "train.run_name=named", "train.steps=4", "model.base_channels=16")
    message = (r"training run named holds a different model: it was trained with "
               r"model.base_channels=8 \(this config: 16\)\. A run name holds one model")
    with pytest.raises(TrainConfigError, match=message):
        finished_run(b.data, b.model, b.diffusion, b.train, b.runtime)
    with pytest.raises(TrainConfigError, match=message):
        train(b)
    longer = cfg_for(digits_root, "train.run_name=named", "train.steps=8")
    with pytest.raises(Exception, match=r"finished at step 4, before train\.steps=8"):
        finished_run(longer.data, longer.model, longer.diffusion, longer.train, longer.runtime)


def test_the_config_a_checkpoint_records_carries_no_credential(digits_root):
    """Every checkpoint's state.json records the pipeline config; a password in
    runtime.mlflow_uri (one with '/' in it too) is not in it."""
    from tasks.train.driver import _resolve

    cfg = cfg_for(digits_root, "train.run_name=secretive")
    pipeline = cfg.to_json_dict()
    pipeline["runtime"]["mlflow_uri"] = "http://admin:pa/ss-word@mlflow:5000"
    fit = _resolve(cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.runtime, pipeline,
                   lambda s: None, None)
    assert "pa/ss-word" not in json.dumps(fit.job)
    assert fit.job["pipeline"]["runtime"]["mlflow_uri"] == "http://mlflow:5000"


def test_negative_steps_is_a_config_error():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(sets=["train.steps=-1"])


@pytest.mark.integration  # the script starts its own Ray cluster
def test_multi_node_cluster_survives_a_node_removed_mid_run(tmp_path):
    """ray.cluster_utils.Cluster (3 raylets here), one worker per node, a node hosting a worker
    removed after the first checkpoint and replaced: training resumes and ends at exactly the
    step count. Where the testbed runs (root, network namespaces), tests/testbed shows the same
    (a worker host lost mid-training) on separate hosts through the Jobs API, and this one is
    skipped: it would add nearly two minutes to the suite for nothing new."""
    from infra.testbed import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("covered on separate hosts by tests/testbed/test_cluster_e2e.py (a worker "
                    "host lost mid-training)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "tasks" / "multinode_train.py"), str(tmp_path),
         "--remove-node"], env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = json.loads(lines[-1][len("RESULT "):])
    m = out["metrics"]
    assert m["status"] == "finished" and m["step"] == 60, proc.stdout[-3000:]
    assert m["resumed_from"] == 20 and m["nodes"] == 2, (proc.stdout[-3000:], proc.stderr[-3000:])

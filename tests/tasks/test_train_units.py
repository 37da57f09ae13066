"""Training-stage pieces without Ray: the checks of a config against the dataset, the batch
iterator and the default run name."""

from __future__ import annotations

import json
import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

from flows.config import load_config
from tasks.errors import TrainConfigError
from tasks.train import EXECUTION_KEYS, _batches, default_run_name, validate
from tests.helpers import TINY_UNET

# The manifest of the embedded digits as preprocessing writes it (what validate reads of it).
DIGITS = {"name": "digits", "version": "0123456789abcdef", "shape": [1, 8, 8],
          "num_classes": 10, "class_names": [str(i) for i in range(10)],
          "splits": {"train": {"rows": 1632}, "val": {"rows": 165}}}


BASE = [*TINY_UNET, "train.batch_size=16", "train.warmup_steps=2"]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.batch_size=5000"], "train.batch_size=5000 is larger than the dataset"),
        (["model.resolution=16"], "model.resolution=16 does not match"),
        (["model.in_channels=3"], "model.in_channels=3 does not match"),
        (["model.num_classes=7"], "model.num_classes=7 but the dataset has 10 classes"),
        (["train.warmup_steps=50", "train.steps=10"], "train.warmup_steps=50 exceeds"),
        (["train.num_workers=3"], "not divisible by train.num_workers=3"),
    ],
)
def test_a_config_is_checked_against_the_dataset_naming_the_key(sets, message):
    """What run_training checks before anything starts (that it checks first:
    test_train.py::test_bad_config_fails_before_any_worker_starts)."""
    cfg = load_config(sets=[*BASE, *sets])
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        validate(cfg.model, cfg.train, DIGITS, cfg.diffusion)


def test_the_tiny_config_fits_the_digits():
    cfg = load_config(sets=BASE)
    validate(cfg.model, cfg.train, DIGITS, cfg.diffusion)  # nothing to complain about


class FakeShard:
    """Stands in for a Ray Data shard: ``rows`` rows in batches, counting passes. Whole blocks
    (``batch_size=None``, how a split held in memory is read) come with each row's index."""

    def __init__(self, rows: int):
        self.x = torch.arange(rows, dtype=torch.uint8)[:, None]
        self.passes = 0

    def iter_torch_batches(self, *, batch_size=None, drop_last=False,
                           local_shuffle_buffer_size=None, local_shuffle_seed=None):
        self.passes += 1
        n = len(self.x)
        if batch_size is None:
            yield {"x": self.x, "label": torch.zeros(n), "row": torch.arange(n)}
            return
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                return
            yield {"x": self.x[i:i + batch_size], "label": torch.zeros(min(batch_size, n - i))}


def take(it, k):
    return [next(it) for _ in range(k)]


def batches(shard, per_worker, *, seed=0, in_memory=False, start=0):
    return _batches(shard, per_worker, seed=seed, start=start, rank=0, world=1,
                    in_memory=in_memory, rows=len(shard.x))


def test_streaming_batches_restart_the_shard_every_epoch():
    shard = FakeShard(10)
    got = take(batches(shard, 4), 5)
    assert all(len(b["x"]) == 4 for b in got)
    assert shard.passes == 3  # 2 full batches per pass; the tail of 2 rows is dropped


def test_in_memory_batches_read_once_then_permute_every_row():
    """Every epoch, the first included, is a seeded permutation of all rows (tasks/train/
    order.py): the shard is read once; no row twice within an epoch; the rows beyond the last
    whole batch differ by epoch, so all are trained on."""
    shard = FakeShard(10)
    got = take(batches(shard, 4, in_memory=True), 2 * 50)  # 2 full batches per epoch
    assert shard.passes == 1
    assert all(len(b["x"]) == 4 and len(b["label"]) == 4 for b in got)
    assert {int(v) for b in got for v in b["x"].flatten()} == set(range(10))
    epochs = [torch.cat([got[2 * e]["x"], got[2 * e + 1]["x"]]).flatten() for e in range(50)]
    assert all(len(set(e.tolist())) == 8 for e in epochs)  # no row twice within an epoch
    assert len({tuple(e.tolist()) for e in epochs}) > 40  # reshuffled each epoch


def test_in_memory_batches_are_reproducible_from_the_seed():
    a = take(batches(FakeShard(10), 4, seed=3, in_memory=True), 12)
    b = take(batches(FakeShard(10), 4, seed=3, in_memory=True), 12)
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b, strict=True))


def test_a_shard_smaller_than_a_batch_is_an_error():
    for in_memory in (True, False):
        with pytest.raises(RuntimeError, match=r"lower train\.batch_size"):
            next(batches(FakeShard(3), 4, in_memory=in_memory))


def test_default_run_name_ignores_how_the_run_is_executed():
    manifest = {"name": "digits", "version": "0123456789abcdef"}
    job = {"model": {"base_channels": 8}, "diffusion": {"T": 100},
           "train": {"steps": 10, "lr": 1e-3, "log_every": 5, "cpu_threads": None}}
    name = default_run_name(manifest, job)
    assert name.startswith("digits-01234567-")
    for key in ("log_every", "cpu_threads"):
        assert key in EXECUTION_KEYS
        assert default_run_name(manifest, job | {"train": job["train"] | {key: 3}}) == name
    assert default_run_name(manifest, job | {"train": job["train"] | {"lr": 2e-3}}) != name
    assert default_run_name(manifest, job | {"model": {"base_channels": 16}}) != name


def test_a_worker_imports_the_loop_without_the_driver():
    """TorchTrainer ships train_loop_per_worker by reference, so every worker imports its module:
    that loads neither the driver nor Prefect, MLflow or the lease (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, tasks.train.worker; print(sorted(m for m in sys.modules if m in "
            "('tasks.train.driver', 'tasks.lease', 'tasks.runtime', 'prefect', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# Console output: Ray's own chatter stays in the Ray session's log files (make demo printed
# hundreds of placement-group-cleaner warnings and every training progress line twice).


def test_training_refuses_ray_train_v1_naming_the_switch(monkeypatch):
    from ray.train.torch import TorchTrainer

    from tasks.train.driver import require_train_v2

    require_train_v2(TorchTrainer)  # this Ray: V2, the default from 2.51
    v1 = type("TorchTrainer", (), {"__module__": "ray.train.torch.torch_trainer"})
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(TrainConfigError, match=r"Ray Train V2 is not active .*"
                       r"RAY_TRAIN_V2_ENABLED .*'0'.*ray>=2\.51"):
        require_train_v2(v1)


def test_ray_train_chatter_and_print_teeing_are_off_for_the_trainer(monkeypatch):
    import ray.train

    from tasks.train.driver import run_config_logging

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    kw = run_config_logging()
    # print() in a worker goes to the console once (Ray Train's patch printed it twice)
    assert kw["worker_runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    # Ray Train's INFO records only in its log files; warnings still on the console (where this
    # Ray has LoggingConfig: the floor of pyproject.toml predates it, make test-min)
    assert ("logging_config" in kw) == hasattr(ray.train, "LoggingConfig")
    if hasattr(ray.train, "LoggingConfig"):
        assert kw["logging_config"].log_level == "WARNING"
    ray.train.RunConfig(**kw)  # what _trainer passes is what this Ray's RunConfig takes
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # a driver's own setting wins
    assert run_config_logging()["worker_runtime_env"]["env_vars"] == {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "1"}


def test_a_local_ray_quiets_the_placement_group_cleaner_in_its_workers(monkeypatch):
    """Without a dashboard (State API) Ray Train's placement-group cleaner warned every second;
    with another Ray on the machine its State API client died guessing the cluster."""
    import ray

    # a Ray without the cleaner (pyproject's floor, make test-min) has nothing to quiet
    pgc = pytest.importorskip(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner")

    from tasks.runtime import QUIET_RAY_LOGGERS, local_ray_worker_setup, ray_init_kwargs

    assert ray_init_kwargs(local=True)["runtime_env"] == {
        "worker_process_setup_hook": local_ray_worker_setup}
    from tasks.runtime import cluster_worker_setup

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_init_kwargs(local=False)["runtime_env"] == {
        "worker_process_setup_hook": cluster_worker_setup}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"pip": ["x"]}}')
    assert "runtime_env" not in ray_init_kwargs(local=False)  # a job's own env is kept
    assert pgc.logger.name in QUIET_RAY_LOGGERS  # the logger Ray's cleaner really uses
    import ray.train.v2._internal.execution.context as train_context

    for logger in (pgc.logger, train_context.logger):
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address="192.0.2.7:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.1:6379")
    local_ray_worker_setup()
    assert not pgc.logger.isEnabledFor(logging.WARNING) and pgc.logger.isEnabledFor(logging.ERROR)
    assert train_context.logger.name == train_context.__file__  # Ray names it by its path
    assert not train_context.logger.isEnabledFor(logging.INFO)
    assert os.environ["RAY_ADDRESS"] == "192.0.2.1:6379"  # one already set is kept
    monkeypatch.delenv("RAY_ADDRESS")
    local_ray_worker_setup()
    assert os.environ["RAY_ADDRESS"] == "192.0.2.7:6379"  # else this worker's own Ray


def test_nothing_runs_between_the_lease_fence_and_the_checkpoint_upload(monkeypatch, tmp_path):
    """The training lease guarantees a fence that passed another ``stale_s / 2`` (tasks.lease):
    the checkpoint's upload (``ray.train.report`` with it) must come right after the check, not
    after MLflow calls whose retries can outlast that margin. The loop of one rank-0 worker with
    Ray's report, the fence and MLflow recorded: at every checkpoint the order is save (local),
    fence, upload, then MLflow; a failed fence stops the loop with nothing uploaded or logged."""
    import ray.train

    import tasks.checkpoints
    from tasks.train import worker
    from tasks.train.config import optim_config

    cfg = load_config(sets=[*BASE, "train.steps=6", "train.checkpoint_every=2",
                            "train.log_every=1", "train.batch_size=4"])
    job = {"run_name": "fence", "run_dir": str(tmp_path), "storage_options": {},
           "lease": {"dir": str(tmp_path), "name": "_training", "token": "t", "stale_s": 120},
           "model": cfg.model.to_dict(), "diffusion": cfg.diffusion.to_dict(),
           "train": cfg.train.model_dump(mode="json"), "class_names": DIGITS["class_names"],
           "pipeline": {}, "dataset": {}}
    w = worker._Worker(job, 0, 1, cfg.train, cfg.diffusion, cfg.model,
                       optim_config(cfg.train, cfg.diffusion), cfg.diffusion.build_schedule(),
                       torch.device("cpu"), None, False)
    s = worker._build(w)
    events: list[tuple] = []
    save = tasks.checkpoints.save_training_checkpoint

    def saved(d, **kw):
        events.append(("save", kw["step"]))
        save(d, **kw)

    def fence(_w):
        step = 2 * (1 + sum(e[0] == "fence" for e in events))  # checkpoint_every=2
        events.append(("fence", step))
        return "the lease was broken" if step == 6 else None

    monkeypatch.setattr(tasks.checkpoints, "save_training_checkpoint", saved)
    monkeypatch.setattr(worker, "_lease_lost", fence)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: events.append(
        ("upload" if checkpoint else "report", metrics["step"])))
    tracker = SimpleNamespace(metrics=lambda m, step: events.append(("mlflow", step)))
    gen = torch.Generator().manual_seed(0)
    batches = iter(lambda: {"x": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8,
                                               generator=gen),
                            "label": torch.zeros(4, dtype=torch.long)}, None)

    worker._train(w, s, s.model, batches, 0, 1, tracker, str(tmp_path))
    for step in (2, 4):
        i = events.index(("upload", step))
        assert events[i - 2:i + 2] == [("save", step), ("fence", step), ("upload", step),
                                       ("mlflow", step)]
    assert events[-2:] == [("save", 6), ("fence", 6)]  # lost: no upload, no MLflow
    assert ("report", 5) in events and ("mlflow", 5) in events
    status = json.loads((tmp_path / "_status.json").read_text())
    assert status["status"] == "lease_lost" and status["last_good_step"] == 4

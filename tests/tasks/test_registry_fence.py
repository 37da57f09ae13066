"""Promotions and rollbacks write the registry only while they hold the model's lease: a
promoter whose lease another process broke and took over while it re-evaluated the champion (it
was cut off from the store) writes nothing, and one that loses it between its writes makes none
of the rest. Real MLflow on SQLite; only the slow step is replaced, to take the lease away in
the middle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tasks import registry
from tasks.errors import RegistryError
from tasks.lease import Lease
from tasks.registry import RegistryConfig, promote, register_model, resolve, rollback
from tests.helpers import DEFAULTS, evaluation, lineage, save_tiny_model, unique_name

CFG = RegistryConfig()


@pytest.fixture(scope="module")
def store(mlflow_store):
    return mlflow_store


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return [save_tiny_model(d / f"m{i}", seed=i) for i in range(3)]


def reg(store, model_dir, name, fd, key):
    return register_model(str(model_dir), tracking_uri=store["uri"], run_id=None, cfg=CFG,
                          model_name=name, evaluation=evaluation(fd, key), lineage=lineage(),
                          defaults=DEFAULTS)


def state(store, name) -> tuple[dict, list[str], dict]:
    """(aliases, champion history, each version's tags) of ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"], store["uri"])
    rm = client.get_registered_model(name)
    versions = {str(mv.version): dict(mv.tags) for mv in
                client.search_model_versions(f"name = '{name}'")}
    return ({a: str(v) for a, v in rm.aliases.items()},
            json.loads(rm.tags.get(registry.HISTORY_TAG, "[]")), versions)


class TakeOver:
    """Another process takes the model's lease: this process's heartbeat stopped landing (it
    was cut off from the store past ``lock_stale_s``), so the other one breaks the lease, as
    stale, and holds it until :meth:`release`."""

    def __init__(self, store, name):
        self.locks, self.name, self.other = Path(store["locks"]), name, None

    def __call__(self) -> None:
        for beat in self.locks.glob(f"{self.name}.lock.*.beat"):
            old = time.time() - 2 * CFG.lock_stale_s
            os.utime(beat, (old, old))
        self.other = Lease(str(self.locks), self.name, stale_s=CFG.lock_stale_s, wait_s=5)
        self.other.__enter__()

    def release(self) -> None:
        self.other.__exit__(None, None, None)


def test_a_promotion_whose_lease_was_taken_while_it_judged_writes_nothing(store, models):
    name = unique_name("fence")
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    reg(store, models[1], name, fd=5.0, key="2" * 16)  # another set: the champion re-evaluated
    before = state(store, name)
    take_over = TakeOver(store, name)

    def evaluate(ref):  # hours, in production: long enough to be cut off and broken
        take_over()
        return evaluation(8.0, key="2" * 16)  # the challenger is better: it would be promoted

    with pytest.raises(RegistryError, match=(
            rf"the registry lease of {name} was lost before this promotion of v2 wrote "
            rf"anything \(while it judged v2 against the champion v1\): the lease .*"
            rf"{name}\.lock is now held by .* pid \d+; nothing was written; rerun promote")):
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                evaluate=evaluate)
    assert state(store, name) == before  # no alias moved, no tag, no history
    take_over.release()
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  evaluate=lambda ref: evaluation(8.0, key="2" * 16))
    assert res["promoted"] and state(store, name)[:2] == ({"champion": "2"}, ["1", "2"])


def test_a_promotion_that_loses_its_lease_between_writes_makes_none_of_the_rest(
        store, models, monkeypatch):
    """Every write is fenced, not only the first: lost after the decision was recorded, the
    champion alias and the history stay as they were."""
    from tasks.registry import promotion

    name = unique_name("fence")
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    reg(store, models[1], name, fd=5.0, key="1" * 16)
    take_over = TakeOver(store, name)
    record = promotion._record_decision

    def record_then_lose(*args, **kwargs):
        record(*args, **kwargs)
        take_over()

    monkeypatch.setattr(promotion, "_record_decision", record_then_lose)
    with pytest.raises(RegistryError, match=(
            rf"the registry lease of {name} was lost after \d+ writes of this promotion of v2: "
            r"the lease .* is now held by .*; the rest were not made; rerun promote")):
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    take_over.release()
    aliases, hist, tags = state(store, name)
    assert aliases == {"champion": "1", "challenger": "2"} and hist == ["1"]
    assert tags["2"]["promotion.decision"] == "promoted"  # made before the lease was lost
    assert "promotion.superseded_by" not in tags["1"]


def test_a_rollback_whose_lease_was_taken_writes_nothing(store, models, monkeypatch):
    """A rollback cut off before its writes (here: while it looked up the version to restore)
    must not undo what the new holder of the lease does."""
    from tasks.registry import promotion

    name = unique_name("fence")
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    reg(store, models[1], name, fd=5.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    before = state(store, name)
    assert before[:2] == ({"champion": "2"}, ["1", "2"])
    take_over = TakeOver(store, name)
    look_up = promotion._version

    def stalls(*args):
        take_over()
        return look_up(*args)

    monkeypatch.setattr(promotion, "_version", stalls)
    with pytest.raises(RegistryError, match=(
            rf"the registry lease of {name} was lost before this rollback of v2 wrote anything "
            rf"\(.*\): the lease .* is now held by .*; nothing was written; rerun rollback")):
        rollback(name, tracking_uri=store["uri"], lock_dir=store["locks"])
    take_over.release()
    assert state(store, name) == before
    assert resolve(f"models:/{name}/2", store["uri"])["tags"].get("promotion.decision") == \
        "promoted"

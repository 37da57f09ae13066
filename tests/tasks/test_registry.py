"""The registry stage on MLflow with a temporary SQLite store: register, resolve, load, promote,
roll back, and the faults (worse challenger, racing promotions, missing names, tampered weights,
unreachable server, a registration that dies before its last step)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch

from diffusion.serialization import WeightsIntegrityError, load_model
from tasks import registry
from tasks.errors import RegistryError, RegistryUnavailable
from tasks.lease import Lease
from tasks.pyfunc_model import decode_pixels, generate
from tasks.registry import (
    RegistryConfig,
    load_version,
    promote,
    register_model,
    resolve,
    rollback,
)
from tests.helpers import (
    DEFAULTS,
    Occupancy,
    ShiftedPaired,
    evaluation,
    lineage,
    local_images,
    run_together,
    save_tiny_model,
    unique_name,
)

CFG = RegistryConfig()


@pytest.fixture(scope="module")
def store(mlflow_store):
    """One SQLite tracking store for the module (each test uses its own model names)."""
    return mlflow_store


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny saved models with different weights."""
    d = tmp_path_factory.mktemp("models")
    return [save_tiny_model(d / f"m{i}", seed=i) for i in range(3)]


def reg(store, model_dir, name, fd, key="a" * 16, run_id=None, cfg=CFG, floor=10.0):
    """A version whose evaluation has ``fd`` and the real-vs-real floor ``floor`` (by default
    one every fd used here passes under registry.max_fd_over_floor)."""
    return register_model(str(model_dir), tracking_uri=store["uri"], run_id=run_id, cfg=cfg,
                          model_name=name, evaluation=evaluation(fd, key, fd_floor=floor),
                          lineage=lineage(), defaults=DEFAULTS)


def by_fd(store, **fds) -> ShiftedPaired:
    """``paired=`` for promote: each version's paired inputs as its fd says, that is its
    ``eval.fd`` tag, or ``fds["v<version>"]`` (e.g. the champion's fd re-evaluated on the
    challenger's set)."""
    def fd(model_ref: str) -> float:
        v = model_ref.rsplit("/", 1)[1]
        return fds.get(f"v{v}", float(resolve(model_ref, store["uri"])["tags"]["eval.fd"]))

    return ShiftedPaired(fd)


def aliases(store, name) -> dict:
    from mlflow import MlflowClient

    rm = MlflowClient(store["uri"], store["uri"]).get_registered_model(name)
    return {a: str(v) for a, v in rm.aliases.items()}


def history(store, name) -> list[str]:
    from mlflow import MlflowClient

    rm = MlflowClient(store["uri"], store["uri"]).get_registered_model(name)
    return json.loads(rm.tags.get(registry.HISTORY_TAG, "[]"))


def weights_file(store, name, version) -> Path:
    """The stored model.safetensors of a version in the local artifact store."""
    from mlflow import MlflowClient

    base = MlflowClient(store["uri"], store["uri"]).get_model_version_download_uri(name, version)
    return Path(urlparse(base).path) / "artifacts" / "model.safetensors"


# ------------------------------------------------------------------------------------------
# Register, resolve, load
# ------------------------------------------------------------------------------------------


def test_register_logs_a_pyfunc_from_code_with_lineage_and_challenger(store, models):
    import mlflow
    from mlflow import MlflowClient

    name = unique_name()
    out = reg(store, models[0], name, fd=10.0)
    assert out["version"] == "1" and out["model_uri"] == f"models:/{name}/1"
    info = resolve(f"models:/{name}@challenger", store["uri"])
    assert info["version"] == "1" and info["aliases"] == ["challenger"]
    tags = info["tags"]
    assert tags["weights_sha256"] == out["weights_sha256"] == json.loads(
        (models[0] / "config.json").read_text())["weights_sha256"]
    assert tags["eval.fd"] == "10.0" and tags["eval.key"] == "a" * 16
    assert tags["dataset.version"] == "d" * 16 and tags["config.sha256"] == "c" * 64
    assert tags["checkpoint.uri"].endswith("checkpoint_000001") and tags["code.version"]
    assert "prefect.flow_run_id" not in tags  # not inside a flow run

    # written as code: the model file and the diffusion package travel, no pickle
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(store["uri"], store["uri"]).get_model_version_download_uri(
            name, "1"), dst_path=str(store["dir"] / "dl"), tracking_uri=store["uri"]))
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    assert (local / "pyfunc_model.py").is_file()
    assert (local / "code" / "diffusion" / "samplers.py").is_file()
    assert not list(local.rglob("*.pkl"))
    sig = mlflow.models.Model.load(str(local)).signature
    assert [c.name for c in sig.inputs.inputs][:2] == ["seed", "index"]
    assert not sig.inputs.inputs[1].required
    # the evaluation is an artifact of the run
    run_art = MlflowClient(store["uri"]).list_artifacts(out["run_id"], "registry")
    assert [a.path for a in run_art] == [f"registry/{name}-v1.evaluation.json"]


def test_registering_the_same_weights_from_the_same_run_is_idempotent(store, models):
    name = unique_name()
    first = reg(store, models[0], name, fd=10.0)
    again = reg(store, models[0], name, fd=10.0, run_id=first["run_id"])
    assert first["new"] and not again["new"]  # the second call found the first one's version
    assert again | {"new": True} == first
    other_run = reg(store, models[0], name, fd=10.0)  # same weights, a new run: a new version
    assert other_run["version"] == "2"
    assert aliases(store, name) == {"challenger": "2"}


def test_load_version_gives_the_registered_weights_and_defaults(store, models, tmp_path):
    name = unique_name()
    reg(store, models[1], name, fd=10.0)
    model, config, defaults = load_version(f"models:/{name}@challenger", store["uri"],
                                           dst=str(tmp_path / "dl"))
    state, saved_config = load_model(models[1])
    assert not model.training and config == saved_config
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert defaults["sampler"]["name"] == "ddim" and defaults["sampler"]["steps"] == 4
    assert defaults["guidance_scale"] == 2.0
    assert (tmp_path / "dl" / "artifacts" / "model.safetensors").is_file()


def test_pyfunc_predict_matches_local_sampling_whatever_the_batch(store, models):
    import mlflow

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    from tasks.registry.session import _fluent_tracking_uri

    with _fluent_tracking_uri(store["uri"]):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    rows = [(11, 3), (12, None), (13, 7)]
    table = pd.DataFrame({"seed": [r[0] for r in rows],
                          "label": [float("nan") if r[1] is None else r[1] for r in rows]})
    out = pyfunc.predict(table)
    assert list(out.columns) == ["seed", "index", "label", "sampler", "steps", "guidance_scale",
                                 "height", "width", "channels", "pixels"]
    assert out["label"].tolist() == [3, -1, 7] and out["sampler"].tolist() == ["ddim"] * 3
    images = [decode_pixels(r) for r in out.to_dict(orient="records")]
    model, config, _ = load_version(f"models:/{name}/1", store["uri"])
    for got, want in zip(images, local_images(model, config, rows), strict=True):
        assert got.shape == (1, 8, 8) and (got == want).all()
    # one row alone, and the rows reversed, give the same images
    alone = pyfunc.predict(pd.DataFrame({"seed": [12]}))
    assert alone["pixels"][0] == out["pixels"][1]
    rev = pyfunc.predict(table.iloc[::-1].reset_index(drop=True))
    assert rev["pixels"].tolist() == out["pixels"].tolist()[::-1]
    _, _, defaults = load_version(f"models:/{name}/1", store["uri"])
    ones = generate(model, config, defaults, table, batch_size=1)  # chunks of one row
    assert ones["pixels"].tolist() == out["pixels"].tolist()
    # per-row settings, and a bad request is a clear error
    custom = pyfunc.predict(pd.DataFrame({"seed": [11], "sampler": ["ddpm"], "steps": [3.0]}))
    assert custom["sampler"][0] == "ddpm" and custom["steps"][0] == 3
    with pytest.raises(Exception, match="label 12 is not a class id"):
        pyfunc.predict(pd.DataFrame({"seed": [1], "label": [12.0]}))


def test_the_served_model_refuses_a_request_over_its_row_bound(store, models):
    """serving.json records registry.serving_max_rows; a request with more rows is a clear
    error (HTTP 400 under `mlflow models serve`) before any sampling."""
    import mlflow

    name = unique_name()
    register_model(str(models[1]), tracking_uri=store["uri"], run_id=None, cfg=CFG,
                   model_name=name, evaluation=evaluation(10.0, "a" * 16), lineage=lineage(),
                   defaults={**DEFAULTS, "max_rows": 2})
    from tasks.registry.session import _fluent_tracking_uri

    with _fluent_tracking_uri(store["uri"]):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert len(pyfunc.predict(pd.DataFrame({"seed": [1, 2]}))) == 2
    with pytest.raises(Exception, match=r"the request has 3 rows; this model makes at most 2 "
                                        r"images per request"):
        pyfunc.predict(pd.DataFrame({"seed": [1, 2, 3]}))
    _, _, defaults = load_version(f"models:/{name}/1", store["uri"])
    assert defaults["max_rows"] == 2


def test_an_alias_moving_while_a_model_loads_does_not_mix_two_versions(store, models,
                                                                         monkeypatch):
    """@champion is resolved once, to a version: if the alias moves while the weights load, the
    loaded model's weights, digest and version are still all one version's."""
    from mlflow import MlflowClient

    from tasks import models as model_refs
    from tasks.runtime import RuntimeConfig

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    reg(store, models[1], name, fd=9.0)
    client = MlflowClient(store["uri"], store["uri"])
    client.set_registered_model_alias(name, "champion", "1")
    load = registry.load_version

    def load_then_move(ref, uri, dst=None):
        out = load(ref, uri, dst)
        client.set_registered_model_alias(name, "champion", "2")  # a promotion lands meanwhile
        return out

    monkeypatch.setattr(registry, "load_version", load_then_move)
    loaded = model_refs.load_model_ref(f"models:/{name}@champion",
                                       RuntimeConfig(mlflow_uri=store["uri"]))
    v1 = client.get_model_version(name, "1").tags["weights_sha256"]
    assert (loaded.version, loaded.weights_sha256) == ("1", v1)
    want, _, _ = load(f"models:/{name}/1", store["uri"])
    for a, b in zip(loaded.model.state_dict().values(), want.state_dict().values(), strict=True):
        assert (a == b).all()


def test_missing_name_alias_and_version_list_what_exists(store, models):
    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    with pytest.raises(RegistryError, match=rf"no registered model named 'nope'.*{name}"):
        resolve("models:/nope@champion", store["uri"])
    with pytest.raises(RegistryError, match=r"no alias @champion; it has @challenger → v1"):
        resolve(f"models:/{name}@champion", store["uri"])
    with pytest.raises(RegistryError, match=r"has no version 9; versions: 1"):
        load_version(f"models:/{name}/9", store["uri"])
    with pytest.raises(RegistryError, match="not a registry reference"):
        resolve("runs:/abc/model", store["uri"])
    with pytest.raises(RegistryError, match="no @challenger to promote"):
        promote(unique_name_registered(store, models), tracking_uri=store["uri"], cfg=CFG,
                lock_dir=store["locks"])


def unique_name_registered(store, models) -> str:
    """A model whose only version has been promoted (so no challenger is left)."""
    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    assert promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])["promoted"]
    return name


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_weights_are_refused_before_any_tensor_is_parsed(store, models, monkeypatch,
                                                                   damage):
    import mlflow
    import safetensors.torch

    name = unique_name()
    reg(store, models[2], name, fd=10.0)
    f = weights_file(store, name, "1")
    data = bytearray(f.read_bytes())
    if damage == "tamper":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))

    def parsed(*a, **k):
        raise AssertionError("a tensor was parsed from damaged weights")

    monkeypatch.setattr(safetensors.torch, "load", parsed)
    with pytest.raises(WeightsIntegrityError, match="SHA-256 mismatch"):
        load_version(f"models:/{name}/1", store["uri"])
    from tasks.registry.session import _fluent_tracking_uri

    with _fluent_tracking_uri(store["uri"]), pytest.raises(Exception, match="SHA-256 mismatch"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")  # what `mlflow models serve` runs


@pytest.mark.parametrize("change", ["weights and serving.json", "config.json"])
def test_the_served_model_checks_its_files_against_the_registry(store, models, change):
    """A version's files rewritten in the artifact store alone, consistently (other weights
    with serving.json updated to match, or another config.json): the served model and
    load_version refuse them, because the registry's digest tags, kept by the tracking server,
    no longer match. (Before, serving checked the weights against serving.json, which sits in
    the same folder, and the config against nothing.)"""
    import hashlib

    import mlflow

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    arts = weights_file(store, name, "1").parent
    serving = json.loads((arts / "serving.json").read_text())
    if change == "config.json":
        config = json.loads((arts / "config.json").read_text())
        config["diffusion"]["T"] = config["diffusion"]["T"] // 2
        (arts / "config.json").write_text(json.dumps(config))
        serving["config_sha256"] = hashlib.sha256((arts / "config.json").read_bytes()).hexdigest()
    else:
        other = (models[1] / "model.safetensors").read_bytes()
        (arts / "model.safetensors").write_bytes(other)
        (arts / "config.json").write_bytes((models[1] / "config.json").read_bytes())
        serving["weights_sha256"] = hashlib.sha256(other).hexdigest()
        serving["config_sha256"] = hashlib.sha256((models[1] / "config.json").read_bytes()
                                                  ).hexdigest()
    (arts / "serving.json").write_text(json.dumps(serving))
    from tasks.registry.session import _fluent_tracking_uri

    with _fluent_tracking_uri(store["uri"]), pytest.raises(
            Exception, match=f"not those any version of {name} in the registry"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    with pytest.raises(Exception, match=r"artifacts were modified"):
        load_version(f"models:/{name}/1", store["uri"])


@pytest.mark.parametrize("hostile", ["../../sitecustomize.py", "absolute"])
def test_a_model_path_from_the_artifact_store_cannot_write_outside_the_download(
        store, models, tmp_path, hostile):
    """Someone who can write to the artifact store rewrites a version's MLmodel so that its
    weights are listed at ``../../sitecustomize.py`` or an absolute path, and puts the file there.
    Loading the version must write nothing outside its download folder (before, the path was
    joined to the destination and a ``sitecustomize.py`` landed outside it, ahead of any digest
    check) and must fail naming the version and the path."""
    import yaml

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    base = weights_file(store, name, "1").parents[1]  # the model's folder in the store
    if hostile == "absolute":
        hostile = str(tmp_path / "outside" / "sitecustomize.py")
    payload = Path(f"{base}/{hostile}")  # where a download of the listed path reads from
    payload.parent.mkdir(parents=True, exist_ok=True)
    payload.write_text("print('runs at every interpreter start')\n")
    mlmodel = yaml.safe_load((base / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["artifacts"]["weights"]["path"] = hostile
    (base / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    dst = tmp_path / "a" / "b" / "dl"
    try:
        with pytest.raises(Exception) as failed:
            load_version(f"models:/{name}/1", store["uri"], dst=str(dst))
        assert not list(tmp_path.rglob("sitecustomize.py"))
        assert failed.type is RegistryError
        failed.match(rf"models:/{name}/1.*{re.escape(hostile)}")
    finally:
        payload.unlink()


def test_a_model_loads_into_a_new_or_empty_folder_only(store, models, tmp_path):
    """What is already in the destination (a link, a file) is never written through."""
    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    dst = tmp_path / "dl"
    dst.mkdir()
    (dst / "artifacts").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(Exception) as failed:
        load_version(f"models:/{name}/1", store["uri"], dst=str(dst))
    assert not (tmp_path / "model.safetensors").exists()
    assert failed.type is RegistryError
    failed.match(rf"{re.escape(str(dst))} is not empty")


# ------------------------------------------------------------------------------------------
# Promotion and rollback
# ------------------------------------------------------------------------------------------


def test_first_promotion_passes_the_absolute_thresholds(store, models):
    name = unique_name()
    cfg = RegistryConfig(thresholds={"fd": 8.0, "memorization": 0.1})
    reg(store, models[0], name, fd=9.0)
    res = promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"])
    assert not res["promoted"] and "fd 9 fails the threshold <= 8" in res["reason"]
    assert "champion" not in aliases(store, name)
    assert resolve(f"models:/{name}/1", store["uri"])["tags"]["promotion.decision"] == "rejected"
    reg(store, models[1], name, fd=7.5)
    res = promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"])
    assert res["promoted"] and res["champion"] == "2" and res["previous"] is None
    assert aliases(store, name) == {"champion": "2"}  # challenger consumed
    assert history(store, name) == ["2"]
    # a later candidate must pass the thresholds too, and a NaN is never promoted
    reg(store, models[2], name, fd=float("nan"))
    res = promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"])
    assert not res["promoted"] and res["champion"] == "2"
    champ = resolve(f"models:/{name}/2", store["uri"])["tags"]
    assert json.loads(champ["promotion.challenge.v3"])["decision"] == "rejected"


def test_a_worse_challenger_leaves_the_champion_untouched(store, models):
    name = unique_name()
    paired = by_fd(store)
    cfg = RegistryConfig(margin=0.02)
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"], paired=paired)
    reg(store, models[1], name, fd=9.9)  # 1% better: not enough
    res = promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"], paired=paired)
    assert not res["promoted"] and res["champion"] == "1" and res["previous"] == "1"
    assert res["challenger_value"] == 9.9 and res["champion_value"] == 10.0
    assert res["improvement"] == pytest.approx(0.01) and "misses" in res["reason"]
    assert aliases(store, name) == {"champion": "1", "challenger": "2"}
    assert history(store, name) == ["1"]
    chall = resolve(f"models:/{name}/2", store["uri"])["tags"]
    champ = resolve(f"models:/{name}/1", store["uri"])["tags"]
    assert chall["promotion.decision"] == "rejected" and chall["promotion.against"] == "1"
    assert chall["promotion.champion_value"] == "10.0" and chall["promotion.margin"] == "0.02"
    assert json.loads(champ["promotion.challenge.v2"])["decision"] == "rejected"
    assert json.loads(chall["promotion.policy"]) == {
        "metric": "fd", "margin": 0.02, "thresholds": {}, "interval_level": 0.95,
        "bootstrap_draws": 2000, "max_fd_over_floor": CFG.max_fd_over_floor}
    assert chall["promotion.paired"] == "true" and "paired interval" in res["reason"]
    assert not res.get("reused")

    # the same challenger, champion and policy: the verdict stands, nothing is rewritten
    again = promote(name, tracking_uri=store["uri"], cfg=cfg,
                    lock_dir=store["locks"], paired=paired)
    assert again["reused"] and not again["promoted"] and again["champion"] == "1"
    assert again["reason"].startswith(res["reason"]) and "unchanged since" in again["reason"]
    assert again["improvement"] == pytest.approx(res["improvement"])
    assert again["decided_at"] == chall["promotion.at"]
    assert resolve(f"models:/{name}/2", store["uri"])["tags"] == chall

    reg(store, models[2], name, fd=9.0)  # 10% better
    res = promote(name, tracking_uri=store["uri"], cfg=cfg, lock_dir=store["locks"], paired=paired)
    assert res["promoted"] and res["champion"] == "3" and res["previous"] == "1"
    assert aliases(store, name) == {"champion": "3"}
    assert history(store, name) == ["1", "3"]
    assert resolve(f"models:/{name}/1", store["uri"])["tags"]["promotion.superseded_by"] == "3"

    # v2 was judged against v1: against the new champion, or under another policy, afresh
    res = promote(name, "2", tracking_uri=store["uri"], cfg=cfg,
                  lock_dir=store["locks"], paired=paired)
    assert not res["promoted"] and not res.get("reused") and res["champion_value"] == 9.0
    assert resolve(f"models:/{name}/2", store["uri"])["tags"]["promotion.against"] == "3"
    looser = RegistryConfig(margin=0.005)
    res = promote(name, "2", tracking_uri=store["uri"], cfg=looser,
                  lock_dir=store["locks"], paired=paired)
    assert not res["promoted"] and not res.get("reused")
    policy = resolve(f"models:/{name}/2", store["uri"])["tags"]["promotion.policy"]
    assert json.loads(policy)["margin"] == 0.005


def test_the_gate_judges_the_paired_interval_of_the_difference(store, models):
    """Sample i of both models comes from the same noise and label (one eval key), so the gate
    bootstraps FD(challenger) − FD(champion) over the same resampled rows of both: a challenger
    whose recorded FD is 5% better but whose samples differ from the champion's by noise is
    rejected with the interval; one clearly closer to the reference is promoted."""
    import numpy as np

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((165, 8)).astype(np.float32)
    base = rng.standard_normal((300, 8)).astype(np.float32)
    samples = {"1": base + 0.3, "2": base + 0.3 + 0.01 * rng.standard_normal((300, 8)),
               "3": base + 0.05}
    asked = []

    def paired(model_ref: str) -> dict:
        asked.append(model_ref)
        return {"setting": "ddim:10", "arrays": {
            "samples/ddim:10": samples[model_ref.rsplit("/", 1)[1]].astype(np.float32),
            "reference": reference}, "samples": 300, "seconds": 12.5}

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    assert asked == []  # the first champion: thresholds only
    reg(store, models[1], name, fd=9.5)
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  paired=paired)
    assert asked == [f"models:/{name}/2", f"models:/{name}/1"]
    assert not res["promoted"] and res["champion"] == "1" and res["paired"]
    assert res["difference_low"] < 0 < res["difference_high"]
    assert "not distinguishable (the interval holds 0)" in res["reason"]
    assert "95% paired interval, 2000 draws, 300 samples each" in res["reason"]
    assert ("with 165 reference images (resampled too) their noise dominates the width and "
            "more samples narrow it little: a larger held-out split (data.val_fraction)"
            in res["reason"])
    assert res["samples"] == 300 and res["eval_seconds"] == 25.0  # the cost: both evaluations
    tags = resolve(f"models:/{name}/2", store["uri"])["tags"]
    assert tags["promotion.paired"] == "true"
    assert tags["promotion.samples"] == "300" and tags["promotion.eval_seconds"] == "25.0"
    assert float(tags["promotion.difference_low"]) == res["difference_low"]

    reg(store, models[2], name, fd=9.9)  # recorded value barely better; the samples much
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  paired=paired)
    assert res["promoted"] and res["champion"] == "3" and res["difference_high"] < 0
    assert "better beyond the noise" in res["reason"]


def test_a_broken_champion_is_replaced_only_by_the_recorded_override(store, models):
    """A champion whose stored FD is NaN (one promoted before NaN were refused, or whose tag was
    rewritten) blocked every later promotion with a reason reading "+nan"; the gate now reports
    it broken, names the command, and that command replaces it, recorded on both versions."""
    from mlflow import MlflowClient

    name = unique_name()
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    MlflowClient(store["uri"], store["uri"]).set_model_version_tag(name, "1", "eval.fd", "nan")
    reg(store, models[1], name, fd=5.0)
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  paired=paired)
    assert not res["promoted"] and res["champion"] == "1" and "+nan" not in res["reason"]
    assert "champion v1 is broken: its fd is nan" in res["reason"]
    assert "diffusion-pipeline promote --version 2 --replace-broken-champion" in res["reason"]
    tags = resolve(f"models:/{name}/2", store["uri"])["tags"]
    assert tags["promotion.decision"] == "refused"
    assert json.loads(tags["promotion.champion_broken"])["version"] == "1"
    # not a verdict on v2: a rerun judges again instead of repeating it
    again = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                    paired=paired)
    assert not again.get("reused") and not again["promoted"]

    res = promote(name, "2", tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  paired=paired, explicit=True, replace_broken=True)
    assert res["promoted"] and "replaces the broken champion v1 (fd nan)" in res["reason"]
    assert aliases(store, name) == {"champion": "2"} and history(store, name) == ["1", "2"]
    tags = resolve(f"models:/{name}/2", store["uri"])["tags"]
    assert tags["promotion.override"] == "replace_broken_champion"
    record = json.loads(resolve(f"models:/{name}/1", store["uri"])["tags"][
        "promotion.challenge.v2"])
    assert record["override"] == "replace_broken_champion" and record["decision"] == "promoted"


def test_without_paired_inputs_a_promotion_is_refused_and_judged_afresh_later(store, models):
    """Compared unpaired, a challenger whose recorded FD is lower by chance was promoted at
    margin 0; now it is refused, not judged, and a rerun that has the paired inputs judges it."""
    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    reg(store, models[1], name, fd=9.9)
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    assert not res["promoted"] and res["champion"] == "1" and not res["paired"]
    assert "not judged" in res["reason"] and "compared unpaired" in res["reason"]
    assert resolve(f"models:/{name}/2", store["uri"])["tags"]["promotion.decision"] == "refused"
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"],
                  paired=by_fd(store))
    assert not res.get("reused") and res["paired"] and res["promoted"]


def test_the_first_champion_is_held_to_its_real_vs_real_floor(store, models):
    """With the default empty registry.thresholds any first model used to be promoted."""
    name = unique_name()
    factor = CFG.max_fd_over_floor
    reg(store, models[0], name, fd=10.0 * factor, floor=1.0)
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])
    assert not res["promoted"] and "champion" not in aliases(store, name)
    assert f"exceeds {factor:g} × eval.fd_floor 1" in res["reason"]
    assert resolve(f"models:/{name}/1", store["uri"])["tags"]["promotion.decision"] == "rejected"
    assert promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"])["reused"]
    # the setting is part of the policy: changed, the rejection is judged again
    looser = RegistryConfig(max_fd_over_floor=20 * factor)
    res = promote(name, tracking_uri=store["uri"], cfg=looser, lock_dir=store["locks"])
    assert res["promoted"] and res["reason"].startswith("first champion: passes fd")


def test_the_samples_a_difference_needs_scale_with_the_square_of_the_interval():
    from diffusion.metrics import Interval
    from tasks.registry.gate import _resolution_hint, samples_to_resolve

    d = Interval(value=-0.5, low=-1.5, high=0.5, level=0.95, draws=2000)  # half-width 1
    assert samples_to_resolve(d, 500) == 2000  # (1 / 0.5)² × 500
    assert samples_to_resolve(Interval(0.0, -1.0, 1.0, 0.95, 2000), 500) is None
    assert samples_to_resolve(d, None) is None
    # the difference to resolve is the interval's centre, the bias-corrected estimate
    corrected = Interval(value=-0.9, low=-1.5, high=0.5, level=0.95, draws=2000, corrected=-0.5)
    assert samples_to_resolve(corrected, 500) == 2000
    # a fixed (large) reference: more samples is the remedy; a small resampled one: it is not
    more = re.search(r"about (\d+) samples per model to tell from noise \(evaluate.num_samples\)",
                     _resolution_hint(d, 500, 10_000))
    assert more and int(more.group(1)) == 2000
    assert "data.val_fraction" in _resolution_hint(d, 500, 165)


def test_another_evaluation_set_needs_the_champion_reevaluated(store, models):
    name = unique_name()
    paired = by_fd(store, v1=8.0)
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    reg(store, models[1], name, fd=9.0, key="2" * 16)
    with pytest.raises(RegistryError, match="pass evaluate="):
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    asked = []

    def evaluate(ref):
        asked.append(ref)
        return evaluation(8.0, key="2" * 16)  # on the challenger's set the champion is better

    with pytest.raises(RegistryError, match="must use the challenger's set"):
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired,
                evaluate=lambda ref: evaluation(1.0, key="3" * 16))
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired,
                  evaluate=evaluate)
    assert asked == [f"models:/{name}/1"]
    assert not res["promoted"] and res["champion_value"] == 8.0
    # judged once: an unchanged rerun does not evaluate the champion again
    again = promote(name, tracking_uri=store["uri"], cfg=CFG,
                    lock_dir=store["locks"], paired=paired,
                    evaluate=evaluate)
    assert asked == [f"models:/{name}/1"] and again["reused"] and again["champion_value"] == 8.0


def test_rollback_moves_the_champion_back_and_refuses_without_a_previous_one(store, models):
    name = unique_name()
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    reg(store, models[1], name, fd=5.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    assert history(store, name) == ["1", "2"]
    res = rollback(name, tracking_uri=store["uri"], lock_dir=store["locks"])
    assert res == {"champion": "1", "previous": "2", "history": ["1"]}
    assert aliases(store, name)["champion"] == "1"
    assert resolve(f"models:/{name}/2", store["uri"])["tags"]["promotion.decision"] == "rolled_back"
    with pytest.raises(RegistryError, match=r"no previous champion.*\['1'\]"):
        rollback(name, tracking_uri=store["uri"], lock_dir=store["locks"])


def test_a_rollback_sticks_until_someone_promotes_that_version_by_name(store, models):
    """The next scheduled run with the same config registers nothing new (register is
    idempotent: it returns the rolled-back version) and asks to promote that version: it is not
    promoted, and the result says why. Only an explicit promote of that version judges it
    again."""
    name = unique_name()
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    first = reg(store, models[1], name, fd=5.0)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    rollback(name, tracking_uri=store["uri"], lock_dir=store["locks"])

    again = reg(store, models[1], name, fd=5.0, run_id=first["run_id"])  # the scheduled rerun
    assert again["version"] == "2" and not again["new"]
    res = promote(name, "2", tracking_uri=store["uri"], cfg=CFG,
                  lock_dir=store["locks"], paired=paired)
    assert not res["promoted"] and res["champion"] == "1" and res["rolled_back"]
    assert res["reason"].startswith("v2 was rolled back at ") and \
        "diffusion-pipeline promote --version 2" in res["reason"]
    assert aliases(store, name) == {"champion": "1"} and history(store, name) == ["1"]

    res = promote(name, "2", tracking_uri=store["uri"], cfg=CFG,
                  lock_dir=store["locks"], paired=paired,
                  explicit=True)
    assert res["promoted"] and aliases(store, name)["champion"] == "2"
    assert history(store, name) == ["1", "2"]


def test_racing_promotions_leave_one_champion_and_a_consistent_history(store, models):
    name = unique_name()
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    reg(store, models[1], name, fd=8.0, key="2" * 16)
    reg(store, models[2], name, fd=6.0, key="2" * 16)
    occupancy = Occupancy()

    def slow_evaluate(ref):
        with occupancy.hold(0.5):
            return evaluation(10.0, key="2" * 16)

    results: dict[str, dict] = {}

    def run(version):
        results[version] = promote(name, version, tracking_uri=store["uri"], cfg=CFG,
                                   lock_dir=store["locks"], paired=paired, evaluate=slow_evaluate)

    run_together(run, ["2", "3"])
    champion = aliases(store, name)["champion"]
    hist = history(store, name)
    promoted = [r for r in results.values() if r["promoted"]]
    assert hist[0] == "1" and hist[-1] == champion == "3"
    assert len(hist) == len(set(hist)) == 1 + len(promoted)
    for r in promoted:  # each promotion saw the champion the history says it replaced
        assert hist[hist.index(r["champion"]) - 1] == r["previous"]
    assert occupancy.most == 1  # the promotions ran one after the other
    assert not list(Path(store["locks"]).iterdir())  # the lease is gone


def test_a_held_lease_makes_a_promotion_wait_then_fail_and_a_stale_one_is_broken(store, models):
    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    # a lease stale after a minute fits MLflow requests of at most 10 s (retries 0, 5 s each)
    quick = RegistryConfig(lock_wait_s=0.5, lock_stale_s=60, retries=0, timeout_s=5)
    with Lease(store["locks"], name, stale_s=60, wait_s=1):
        with pytest.raises(RegistryError, match=rf"another promotion or rollback of {name} is "
                           r"running: the lease .* is held by"):
            promote(name, tracking_uri=store["uri"], cfg=quick, lock_dir=store["locks"])
        assert "champion" not in aliases(store, name)  # the waiting promotion did nothing
    lock = Path(store["locks"]) / f"{name}.lock"
    lock.write_text(json.dumps({"token": "dead", "host": "gone", "pid": 1, "at": 0}))
    os.utime(lock, (time.time() - 120, time.time() - 120))  # the store last saw it 2 min ago
    assert promote(name, tracking_uri=store["uri"], cfg=quick, lock_dir=store["locks"])["promoted"]
    assert not lock.exists()


# ------------------------------------------------------------------------------------------
# MLflow unreachable, or failing half-way
# ------------------------------------------------------------------------------------------


@pytest.fixture
def connections(monkeypatch):
    """Every HTTP connection this process opens (MLflow's client among them), each with the
    MLflow HTTP settings in force when it was opened."""
    import urllib3.connection

    opened = []
    real = urllib3.connection.HTTPConnection.connect
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")

    def connect(self):
        opened.append({k: os.environ.get(k) for k in keys})
        return real(self)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", connect)
    return opened


def test_an_unreachable_server_fails_within_bounded_retries(models, monkeypatch, connections):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the caller's own value
    uri = "http://127.0.0.1:9"
    for retries in (0, 2):
        connections.clear()
        cfg = RegistryConfig(retries=retries, timeout_s=2)
        with pytest.raises(RegistryUnavailable, match=r"cannot reach MLflow at http://127\.0\.0"
                           r"\.1:9 .*MLFLOW_TRACKING_URI"):
            register_model(str(models[0]), tracking_uri=uri, run_id=None, cfg=cfg,
                           model_name="never", evaluation=evaluation(1.0), lineage=lineage(),
                           defaults=DEFAULTS)
        # the bound takes effect: one attempt, then exactly `retries` more, under our settings
        assert len(connections) == 1 + retries
        assert all(c["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(retries) for c in connections)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # the caller's value is back


def test_a_server_that_never_answers_times_out(models, connections):
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never responds
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RegistryUnavailable, match=r"1 s timeout each\): .*timed out"):
            register_model(str(models[0]), tracking_uri=uri, run_id=None,
                           cfg=RegistryConfig(retries=1, timeout_s=1), model_name="never",
                           evaluation=evaluation(1.0), lineage=lineage(), defaults=DEFAULTS)
    # two attempts, each under a 1 s timeout (MLflow's own default waits 120 s per attempt)
    assert [c["MLFLOW_HTTP_REQUEST_TIMEOUT"] for c in connections] == ["1", "1"]


def test_a_registration_that_fails_before_its_last_step_leaves_no_challenger(store, models,
                                                                               monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = unique_name()
    reg(store, models[0], name, fd=10.0)
    real = MlflowClient.log_dict

    def dropped(self, *a, **k):
        raise MlflowException("API request to http://mlflow/api/2.0/mlflow/artifacts failed "
                              "with exception Connection refused")

    monkeypatch.setattr(MlflowClient, "log_dict", dropped)
    with pytest.raises(RegistryUnavailable, match="cannot reach MLflow"):
        out = reg(store, models[1], name, fd=9.0)
    assert aliases(store, name) == {"challenger": "1"}  # v2 exists but is nobody's challenger
    run_id = resolve(f"models:/{name}/2", store["uri"])["tags"]
    assert run_id["weights_sha256"]
    monkeypatch.setattr(MlflowClient, "log_dict", real)
    from mlflow import MlflowClient as C

    v2 = C(store["uri"], store["uri"]).get_model_version(name, "2")
    out = reg(store, models[1], name, fd=9.0, run_id=v2.run_id)  # the retry finishes the job
    assert out["version"] == "2" and aliases(store, name) == {"challenger": "2"}


# ------------------------------------------------------------------------------------------
# Config and Prefect wrappers
# ------------------------------------------------------------------------------------------


def test_registry_config_validation_and_model_name():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="metric 'is' is unknown; use one of fd, nll_bpd"):
        RegistryConfig(metric="is")
    with pytest.raises(ValidationError, match="metric 'acc' is unknown"):
        RegistryConfig(thresholds={"acc": 0.9})
    with pytest.raises(ValidationError, match="extra"):
        RegistryConfig(nope=1)
    assert registry.model_name_for(RegistryConfig(), "digits") == "digits-diffusion"
    assert registry.model_name_for(RegistryConfig(model_name="x"), "digits") == "x"
    assert registry.improvement(9.0, 10.0, "fd") == pytest.approx(0.1)


def test_inside_a_flow_run_the_version_records_it(store, models, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5e1d2c-flow-run")  # what a flow run's env holds
    name = unique_name()
    from flows.registry import register_task

    out = register_task.fn(  # the Prefect task's body, without a Prefect server
        str(models[0]), tracking_uri=store["uri"], run_id=None, cfg={}, model_name=name,
        evaluation=evaluation(1.0), lineage=lineage(), defaults=DEFAULTS)
    tags = resolve(out["model_uri"], store["uri"])["tags"]
    assert tags["prefect.flow_run_id"] == "0b5e1d2c-flow-run"


def test_the_flow_run_reaches_the_lineage_from_flows_not_from_a_lookup_in_tasks(monkeypatch):
    """tasks/ never asks Prefect (tests/test_layers.py): inside a flow run, register_task passes
    the flow run's id in the lineage; lineage_tags records what it is given, nothing more."""
    import prefect.runtime  # noqa: F401 - loaded, as in a flow run's process

    from tasks.registry.lineage import lineage_tags

    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5e1d2c-flow-run")
    given = {"config.sha256": "c" * 64, "checkpoint.uri": "s3://b/ckpt",
             "dataset.version": "d" * 16}
    assert "prefect.flow_run_id" not in lineage_tags({}, given)
    tags = lineage_tags({}, given | {"prefect.flow_run_id": "0b5e1d2c-flow-run"})
    assert tags["prefect.flow_run_id"] == "0b5e1d2c-flow-run"


def test_missing_lineage_is_refused(models, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RegistryError, match=r"lineage lacks config\.sha256, checkpoint\.uri"):
        register_model(str(models[0]), tracking_uri=uri, run_id=None, cfg=CFG,
                       model_name=unique_name(), evaluation=evaluation(1.0), lineage={},
                       defaults=DEFAULTS)
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


# -- the registry lease fences every write (issue 25 item 4) -------------------------------------
# Promotions and rollbacks write the registry only while they hold the model's lease: a
# promoter whose lease another process broke and took over while it re-evaluated the champion (it
# was cut off from the store) writes nothing, and one that loses it between its writes makes none
# of the rest. Real MLflow on SQLite; only the slow step is replaced, to take the lease away in
# the middle.


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
    paired = by_fd(store, v1=8.0)
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
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
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired,
                evaluate=evaluate)
    assert state(store, name) == before  # no alias moved, no tag, no history
    take_over.release()
    res = promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired,
                  evaluate=lambda ref: evaluation(8.0, key="2" * 16))
    assert res["promoted"] and state(store, name)[:2] == ({"champion": "2"}, ["1", "2"])


def test_a_promotion_that_loses_its_lease_between_writes_makes_none_of_the_rest(
        store, models, monkeypatch):
    """Every write is fenced, not only the first: lost after the decision was recorded, the
    champion alias and the history stay as they were."""
    from tasks.registry import promotion

    name = unique_name("fence")
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
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
        promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
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
    paired = by_fd(store)
    reg(store, models[0], name, fd=10.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
    reg(store, models[1], name, fd=5.0, key="1" * 16)
    promote(name, tracking_uri=store["uri"], cfg=CFG, lock_dir=store["locks"], paired=paired)
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

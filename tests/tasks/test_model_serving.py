"""The registry against real MLflow processes on loopback: an ``mlflow server`` (SQLite backend,
proxied artifacts) that we register, promote and load through, and ``mlflow models serve
--env-manager local`` answering image requests for a registered version over HTTP."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tasks.pyfunc_model import decode_pixels
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
    ShiftedPaired,
    evaluation,
    free_port,
    lineage,
    local_images,
    save_tiny_model,
    start,
    stop,
    unique_name,
    wait_http,
)

pytestmark = pytest.mark.integration  # MLflow server processes, started by the tests
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-models")
    return [save_tiny_model(d / f"m{i}", seed=10 + i) for i in range(2)]


def test_register_promote_and_load_through_an_mlflow_server(tmp_path, models):
    port = free_port()
    log = tmp_path / "server.log"
    proc = start([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"], log, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120, log=log)
        uri = f"http://127.0.0.1:{port}"
        cfg = RegistryConfig(margin=0.05)
        name = unique_name("srv")
        locks = str(tmp_path / "locks")
        fds = (10.0, 8.0)  # the second judged on paired inputs that say it is better
        paired = ShiftedPaired(lambda ref: fds[int(ref.rsplit("/", 1)[1]) - 1])
        for i, fd in enumerate(fds):
            out = register_model(str(models[i]), tracking_uri=uri, run_id=None, cfg=cfg,
                                 model_name=name, evaluation=evaluation(fd, fd_floor=10.0),
                                 lineage=lineage(), defaults=DEFAULTS)
            assert out["version"] == str(i + 1)
            res = promote(name, tracking_uri=uri, cfg=cfg, lock_dir=locks, paired=paired)
            assert res["promoted"] and res["champion"] == str(i + 1)
        info = resolve(f"models:/{name}@champion", uri)
        assert info["version"] == "2" and info["tags"]["promotion.against"] == "1"
        _, config, defaults = load_version(f"models:/{name}@champion", uri)
        assert config["diffusion"]["T"] == 100 and defaults["sampler"]["name"] == "ddim"
        assert rollback(name, tracking_uri=uri, lock_dir=locks)["champion"] == "1"
        # the artifacts went through the server's proxy into its destination
        assert list((tmp_path / "artifacts").rglob("model.safetensors"))
    finally:
        stop(proc)


def test_models_serve_answers_image_requests_like_a_local_load(tmp_path, models):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    name = unique_name("serve")
    register_model(str(models[0]), tracking_uri=uri, run_id=None, cfg=RegistryConfig(),
                   model_name=name, evaluation=evaluation(10.0), lineage=lineage(),
                   defaults=DEFAULTS)
    port = free_port()
    log = tmp_path / "serve.log"
    # --env-manager local: the current environment serves; nothing is built or downloaded. It
    # shells out to `uvicorn`, so the environment's bin directory must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = start([MLFLOW, "models", "serve", "-m", f"models:/{name}@challenger",
                  "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], log, tmp_path, env={"MLFLOW_TRACKING_URI": uri, "PATH": path})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180, log=log)
        rows = [(5, 2), (6, None)]
        body = {"dataframe_split": {"columns": ["seed", "label"],
                                    "data": [[s, lab] for s, lab in rows]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            predictions = json.loads(r.read())["predictions"]
        assert [p["label"] for p in predictions] == [2, -1]
        model, config, _ = load_version(f"models:/{name}@challenger", uri)
        for p, want in zip(predictions, local_images(model, config, rows), strict=True):
            assert np.array_equal(decode_pixels(p), want)
        # a bad request is a 400 that says what is wrong
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_records": [{"seed": 1, "sampler": "nope"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400 and "sampler 'nope' is unknown" in e.value.read().decode()
    finally:
        stop(proc)

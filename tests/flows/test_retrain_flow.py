"""`diffusion-pipeline run` (the `retrain` flow) end to end, as separate processes against
Prefect's test server, with the storage root on the loopback S3 server and MLflow behind a real
`mlflow server` with its basic-auth app and S3 artifacts:

- killed (SIGKILL of its whole session) during training, then rerun: it resumes from the last
  checkpoint in the bucket and completes; run again: every stage is skipped and Ray is never
  started;
- no credential (S3's keys in the environment, MLflow's password in ``runtime.mlflow_uri``)
  appears in any output, Ray log, MLflow param or tag, Prefect log, artifact or flow-run
  parameter, or stored object.

The end of a run on a local root (MLflow on SQLite beside it) is checked without running it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import free_port, invoke, wait_http

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "model": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
              "attention_resolutions": []},
    "diffusion": {"T": 100},
    # a checkpoint costs ~2 s here (a synchronous Ray Train report): few, far apart
    "train": {"steps": 200, "batch_size": 16, "warmup_steps": 5, "checkpoint_every": 100,
              "log_every": 100},
    "evaluate": {"num_samples": 100, "frontier": ["ddim:10"], "nll_images": 8,
                 "reference_steps": 100, "batch_size": 100},
    "generate": {"num_samples": 120, "shard_size": 60},
    "runtime": {"ray_num_cpus": 2},
    # a 200-step tiny model is far from the real-vs-real floor; its quality is not what these
    # tests are about (the floor rule: tests/tasks/test_gate_rule.py), its promotion is
    "registry": {"max_fd_over_floor": 1000},
}


@pytest.fixture(scope="module")
def prefect_env(prefect_harness) -> dict[str, str]:
    """The environment of a CLI process that reports to the test session's Prefect server."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DIFFUSION_PIPELINE_FAULT"):
        env.pop(k, None)
    return env


def config_file(tmp_path: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "diffusion-pipeline"), "run", *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-5000:]
    return out


def stages(summary: dict) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in summary["stages"]}


def latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no Prefect artifact {key!r}"
    return found[0].data


def glob_s3(s3, pattern: str) -> list[str]:
    s3.client.invalidate_cache()  # s3fs caches listings; the pipeline writes meanwhile
    return s3.client.glob(pattern)


def find_s3(s3, bucket: str) -> list[str]:
    s3.client.invalidate_cache()
    return s3.client.find(bucket)


def test_run_on_s3_killed_resumed_rerun_and_no_credential_leaks(prefect_env, s3, tmp_path,
                                                                 kill_session):
    bucket = s3.bucket()
    secrets = {"AWS_ACCESS_KEY_ID": "AKIDPIPELINE" + uuid.uuid4().hex[:8].upper(),
               "AWS_SECRET_ACCESS_KEY": "s3secret-" + uuid.uuid4().hex,
               "MLFLOW_TRACKING_PASSWORD": "mlflowpw-" + uuid.uuid4().hex}
    server_env = {**prefect_env, **secrets, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
                  "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                  "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["MLFLOW_TRACKING_PASSWORD"],
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # as infra/docker/mlflow_entrypoint.py
    server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    server_env.pop("MLFLOW_TRACKING_PASSWORD")
    port = free_port()
    slog = tmp_path / "mlflow-server.log"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=server_env, stdout=slog.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", server, timeout=120, log=slog)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no entry
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401

        # the MLflow password rides in runtime.mlflow_uri (user:password@host), where the config
        # that checkpoints, MLflow params and Prefect record would carry it; S3's keys in the
        # environment
        env = {k: v for k, v in {**prefect_env, **secrets, "AWS_ENDPOINT_URL": s3.endpoint}
               .items() if k != "MLFLOW_TRACKING_PASSWORD"}
        password = secrets["MLFLOW_TRACKING_PASSWORD"]
        root = f"{bucket}/pipeline"
        args = ["--config", str(config_file(tmp_path, runtime={
            "mlflow_uri": f"http://admin:{password}@127.0.0.1:{port}"})),
            "--root", f"s3://{root}"]
        started = time.time()

        # 1. killed once the first checkpoint is in the bucket: no summary, the run unfinished
        log1 = tmp_path / "run1.log"
        proc = run_cli([*args, "--summary-json", str(tmp_path / "s1.json")], env, log1)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not glob_s3(
                    s3, f"{root}/runs/*/checkpoint_*/state.json"):
                assert proc.poll() is None, log1.read_text()[-5000:]
                time.sleep(0.5)
            assert glob_s3(s3, f"{root}/runs/*/checkpoint_*/state.json"), \
                log1.read_text()[-5000:]
        finally:
            kill_session(proc)
        assert not (tmp_path / "s1.json").exists()
        status_files = glob_s3(s3, f"{root}/runs/*/_status.json")
        status = json.loads(s3.client.cat_file(status_files[0])) if status_files else {}
        assert status.get("status") != "finished"

        # 2. rerun: the dataset is reused, training resumes from a checkpoint and the rest runs
        log2 = tmp_path / "run2.log"
        out2 = finish(run_cli([*args, "--summary-json", str(tmp_path / "s2.json")], env, log2),
                      log2)
        summary_text = (tmp_path / "s2.json").read_text()
        s2 = json.loads(summary_text)
        assert stages(s2) == {"preflight": "done", "preprocess": "reused", "train": "done",
                              "evaluate": "done", "register": "done", "promote": "promoted",
                              "generate": "done"}, out2[-3000:]
        m = s2["train"]["metrics"]
        assert m["step"] == 200 and m["status"] == "finished" and 100 <= m["resumed_from"] < 200
        assert "[3/7] train done" in out2 and f"(resumed from step {m['resumed_from']})" in out2
        # the killed driver's training lease was taken over at once, not after it went stale
        assert "breaking the dead holder's lease" in out2 and "_training.lock" in out2
        assert s2["promotion"]["champion"] == "1" and s2["registered"]["model_uri"] == \
            "models:/digits-diffusion/1"
        # the evaluation is stored in the bucket too
        ev = s2["evaluation"]
        assert ev["stored_at"].startswith(f"s3://{root}/evaluations/")
        assert ev["metrics"]["fd"] > 0 and ev["default_sampler"] == {"name": "ddim", "steps": 10}
        grid = s2["generation"]["grid"]
        assert grid.startswith(f"s3://{root}/generations/")
        assert grid.rsplit("/", 1)[0] == s2["generation"]["output"]
        from io import BytesIO

        from PIL import Image

        img = np.asarray(Image.open(BytesIO(s3.client.cat_file(grid.removeprefix("s3://")))))
        assert img.ndim == 2 and img.shape[0] > 10 * 8 * 6  # ten rows (classes) of 8x8 at 6x
        # the end of the output says where everything is and how to open the UIs
        for text in ("retrain finished in", "sample grid", grid, f"MLflow   {uri}",
                     "open the UIs", "Prefect  "):
            assert text in out2, text

        # Prefect artifacts of the run: the markdown summary and the sample grid
        summary_md = latest_artifact("retrain-summary")
        assert s2["dataset"]["version"] in summary_md and "promoted to @champion" in summary_md
        assert "| ddim | 10 |" in summary_md  # the evaluation table
        assert "data:image/png;base64," in latest_artifact("retrain-samples")

        # everything landed in the bucket: dataset, run, evaluation, samples, grid, MLflow's
        # artifacts
        keys = find_s3(s3, bucket)
        for part in ("pipeline/datasets/digits/", "pipeline/runs/", "pipeline/evaluations/",
                     "pipeline/generations/", "mlflow/"):
            assert any(k.startswith(f"{bucket}/{part}") for k in keys), part
        assert any(k.endswith("/grid.png") for k in keys)
        assert any(k.endswith("model.safetensors") and "/mlflow/" in k for k in keys)

        # 3. unchanged rerun: every stage skipped, Ray never started, the same outputs
        log3 = tmp_path / "run3.log"
        out3 = finish(run_cli([*args, "--summary-json", str(tmp_path / "s3.json")], env, log3),
                      log3)
        s3_summary = json.loads((tmp_path / "s3.json").read_text())
        assert stages(s3_summary) == {
            "preflight": "done", "preprocess": "reused", "train": "reused", "evaluate": "reused",
            "register": "reused", "promote": "reused", "generate": "reused"}
        assert s3_summary["ray_start_s"] == 0
        assert s3_summary["train"]["checkpoint_uri"] == s2["train"]["checkpoint_uri"]
        assert s3_summary["generation"]["output"] == s2["generation"]["output"]

        # MLflow: the training run holds the grid; version 1, the only one, is the champion.
        # No credential anywhere: CLI output, summary, MLflow params/tags, Prefect logs and
        # artifacts, stored JSON files
        from mlflow import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
        os.environ["MLFLOW_TRACKING_PASSWORD"] = secrets["MLFLOW_TRACKING_PASSWORD"]
        try:
            client = MlflowClient(uri)
            grid_artifacts = [a.path for a in client.list_artifacts(
                s2["train"]["mlflow_run_id"], "samples")]
            champion = client.get_model_version_by_alias("digits-diffusion", "champion")
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            versions = client.search_model_versions("name='digits-diffusion'")
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        assert grid_artifacts == ["samples/generated-grid.png"]
        assert str(champion.version) == "1" and len(versions) == 1
        assert runs
        recorded = json.dumps([[r.data.params, r.data.tags] for r in runs]
                              + [v.tags for v in versions])
        keys = find_s3(s3, bucket)
        stored = {k: s3.client.cat_file(k) for k in keys}  # every object, whatever its kind
        assert len(stored) > 20 and any(k.endswith(".parquet") for k in stored)
        texts = {"output": log1.read_text() + out2 + out3, "summary": summary_text,
                 "mlflow": recorded, "prefect": prefect_texts(started)}
        for name, value in secrets.items():
            for where, text in texts.items():
                assert value not in text, f"{name} leaked into {where}"
            for key, data in stored.items():
                assert value.encode() not in data, f"{name} leaked into s3://{key}"
            for path, data in ray_logs(started):
                assert value.encode() not in data, f"{name} leaked into {path}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def ray_logs(since: float):
    """(path, bytes) of every file in the local Ray sessions' folders written since ``since``
    (the CLI runs started Ray here: its logs, the workers' output, the job's runtime files)."""
    import tempfile

    for session in Path(tempfile.gettempdir(), "ray").glob("session_2*"):
        for path in session.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                try:
                    yield path, path.read_bytes()
                except OSError:  # a socket or a file removed meanwhile
                    continue


def prefect_texts(since: float) -> str:
    """Every log line, artifact and flow-run parameter the Prefect server holds from flow runs
    since ``since``."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    after = datetime.fromtimestamp(since - 60, UTC)
    with get_client(sync_client=True) as client:
        logs, page = [], None
        while page is None or len(page) == 200:  # the API's largest page
            page = client.read_logs(
                log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=after)), limit=200,
                offset=len(logs))
            logs += page
        arts = client.read_artifacts(limit=200)
        runs = client.read_flow_runs(limit=200)
    assert logs and runs
    return ("\n".join(l.message for l in logs) + "\n".join(str(a.data) for a in arts)
            + "\n".join(json.dumps(r.parameters, default=str) for r in runs))


def test_cli_run_help_and_a_bad_config_fail_before_any_work(tmp_path):
    help_ = invoke(["run", "--help"])
    assert help_.exit_code == 0
    for opt in ("--config", "--set", "--root", "--no-generate", "--summary-json", "--debug"):
        assert opt in help_.output
    bad = invoke(["run", "--root", str(tmp_path), "--set", "train.steps=-1"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith("error: invalid config: train.steps")
    assert "Traceback" not in bad.output and not (tmp_path / "datasets").exists()


@pytest.mark.parametrize("prefect_api", [None, "http://127.0.0.1:4321/api"])
def test_the_end_of_a_local_run_says_where_everything_is(monkeypatch, tmp_path, prefect_api):
    """What `run` prints last, for a run on a local root: MLflow on SQLite beside it is opened
    with `mlflow ui` (a run against an MLflow server names the server: the test above)."""
    from flows.cli import where_everything_is

    if prefect_api:
        monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    else:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root = tmp_path / "root"
    grid = f"{root}/generations/0123abcd/grid.png"
    out = where_everything_is({
        "seconds": 93.4, "stages": [{"stage": "train", "status": "done", "seconds": 41.2}],
        "dataset": {"manifest_uri": f"{root}/datasets/digits/0123456789abcdef/_manifest.json"},
        "train": {"checkpoint_uri": f"{root}/runs/r/checkpoint_000300"},
        "registered": {"model_uri": "models:/digits-diffusion/1", "version": "1"},
        "promotion": {"champion": "1"},
        "generation": {"output": f"{root}/generations/0123abcd", "num_samples": 120,
                       "grid": grid},
        "tracking_uri": f"sqlite:///{root}/mlflow.db"})
    for text in ("retrain finished in", "sample grid", grid, "mlflow ui --backend-store-uri "
                 f"sqlite:///{root}/mlflow.db", "open the UIs", "Prefect  "):
        assert text in out, text
    assert ("Prefect  http://127.0.0.1:4321" in out) == bool(prefect_api)

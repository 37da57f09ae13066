"""tasks.storage's pure helpers (no server): redacting credentials from URLs and configs."""

from __future__ import annotations

import os

import pytest

from tasks.storage import redact, redact_all


@pytest.mark.parametrize(("url", "shown"), [
    ("http://admin:s3cret@mlflow:5000", "http://mlflow:5000"),
    # a password holding '/' or '@' (the old pattern stopped at the '/' and kept it all)
    ("http://admin:pa/ss@mlflow:5000", "http://mlflow:5000"),
    ("http://admin:p@ss@mlflow:5000/x", "http://mlflow:5000/x"),
    ("http://admin:a/b/c@mlflow:5000/api@v2", "http://mlflow:5000/api@v2"),
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    # query tokens: presigned URLs, API tokens
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab&X-Amz-Date=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),
    ("http://h:5000/api?token=abc&page=2", "http://h:5000/api?token=***&page=2"),
    # nothing to take out: left exactly as it was
    ("s3://bucket/models@v1/x", "s3://bucket/models@v1/x"),
    ("http://h:5000/a/b@c", "http://h:5000/a/b@c"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("models:/digits@champion", "models:/digits@champion"),
    ("/local/path", "/local/path"),
])
def test_redact_takes_out_every_credential_a_url_carries(url, shown):
    assert redact(url) == shown


def test_redact_all_walks_json():
    cfg = {"runtime": {"mlflow_uri": "http://u:pa/ss@h:5000", "root": "s3://b/p"},
           "list": ["https://x?token=t", 3, None]}
    assert redact_all(cfg) == {"runtime": {"mlflow_uri": "http://h:5000", "root": "s3://b/p"},
                               "list": ["https://x?token=***", 3, None]}


def test_credentials_in_the_mlflow_uri_go_to_mlflows_variables_not_the_config(monkeypatch):
    """A user:password@ in runtime.mlflow_uri (or MLFLOW_TRACKING_URI) is handed to MLflow as
    MLFLOW_TRACKING_USERNAME/PASSWORD, percent-decoded, and the config keeps the URI without
    it: nothing that prints, stores or records the config (Prefect's flow-run parameters
    included) can carry it."""
    from tasks.runtime import RuntimeConfig
    from tasks.tracking import tracking_uri

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    rt = RuntimeConfig(mlflow_uri="https://ops:p%40ss%2Fw0rd@mlflow.example:5000/x?token=t")
    assert rt.mlflow_uri == "https://mlflow.example:5000/x?token=***"
    assert "p%40ss" not in rt.model_dump_json()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss/w0rd"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:s3cret@h:5000")
    assert tracking_uri(RuntimeConfig(), None) == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert RuntimeConfig(mlflow_uri="sqlite:///tmp/m.db").mlflow_uri == "sqlite:///tmp/m.db"

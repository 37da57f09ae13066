"""tasks.storage's pure helpers (no server): redacting credentials from URLs and configs."""

from __future__ import annotations

import os
import re
from typing import ClassVar

import pytest

from tasks.storage import redact, redact_all


@pytest.mark.parametrize(("url", "shown"), [
    ("http://admin:s3cret@mlflow:5000", "http://mlflow:5000"),
    # a password holding '/' or '@' (the old pattern stopped at the '/' and kept it all)
    ("http://admin:pa/ss@mlflow:5000", "http://mlflow:5000"),
    ("http://admin:p@ss@mlflow:5000/x", "http://mlflow:5000/x"),
    ("http://admin:a/b/c@mlflow:5000/api%40v2", "http://mlflow:5000/api%40v2"),
    # a raw '#' or '?' in the password (urlsplit would end the authority there)
    ("http://admin:a#b?c@mlflow:5000/x?page=2", "http://mlflow:5000/x?page=2"),
    # fails closed: a raw '@' after '://' ends credentials, wherever it is ('h' could be a user,
    # '5000/a/b' its password); an '@' in an HTTP path is written %40
    ("http://admin:a/b/c@mlflow:5000/api@v2", "http://v2"),
    ("http://h:5000/a/b@c", "http://c"),
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    # an S3 key pair with the secret's '/' raw (a bucket name holds no ':')
    ("s3://AKIAX:ab/cd+ef@bucket/k@v1", "s3://v1"),
    # query tokens: presigned URLs, API tokens
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab&X-Amz-Date=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),
    ("http://h:5000/api?token=abc&page=2", "http://h:5000/api?token=***&page=2"),
    ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
    # nothing to take out: left exactly as it was
    ("s3://bucket/models@v1/x", "s3://bucket/models@v1/x"),
    ("http://h:5000/a/b%40c", "http://h:5000/a/b%40c"),
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
        monkeypatch.setenv(var, "")  # so that the teardown restores (removes) what a test sets
        monkeypatch.delenv(var)
    rt = RuntimeConfig(mlflow_uri="https://ops:p%40ss%2Fw0rd@mlflow.example:5000/x?token=t")
    assert rt.mlflow_uri == "https://mlflow.example:5000/x?token=***"
    assert "p%40ss" not in rt.model_dump_json()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss/w0rd"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:s3cret@h:5000")
    assert tracking_uri(RuntimeConfig(), None) == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert RuntimeConfig(mlflow_uri="sqlite:///tmp/m.db").mlflow_uri == "sqlite:///tmp/m.db"


# Each character that ends a URL part somewhere (or is percent-encoding): a password typed raw
# into a URL can hold any of them, and redact must never let a piece of it through.
HARD = "#?/@:%+ "


def _passwords() -> list[str]:
    import random

    rng = random.Random(25)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + HARD
    out = [f"Pw{c}{c}9xQ" for c in HARD] + [f"{c}lead1ngZ" for c in HARD] + \
          [f"trail1ngZ{c}" for c in HARD] + ["1234/5678", "8265/api@v2", "k#x?y/z@w"]
    for c in HARD:  # each hard character at least once, among random others
        for _ in range(12):
            s = [rng.choice(alphabet) for _ in range(rng.randint(6, 14))]
            s.insert(rng.randint(0, len(s)), c)
            out.append("".join(s))
    return out


@pytest.mark.parametrize("scheme", ["http", "https", "postgresql", "mysql+pymysql", "ray",
                                    "s3"])
@pytest.mark.parametrize("tail", ["", ":5000", ":5000/", "/db", ":8265/api/jobs?page=2",
                                  "/x#frag"])
def test_redact_fails_closed_for_any_password(scheme, tail):
    """Whatever a raw password holds ('#', '?', '/', '@', ':', '%', '+', ' '), none of it is
    left in the redacted URL: the credentials run from '://' to the last '@'."""
    for pw in _passwords():
        url = f"{scheme}://ops:{pw}@mlflow.example{tail}"
        shown = redact(url)
        assert pw not in shown, (url, shown)
        assert "ops" not in shown, (url, shown)
        for piece in (p for p in re.split(r"[#?/@: ]", pw)
                      if len(p) >= 4 and p not in f"mlflow.example{tail}"):
            assert piece not in shown, (url, shown, piece)


def test_credentials_to_mlflow_takes_a_raw_password_whole(monkeypatch):
    """A raw '#' or '?' in the password does not cut it short (urlsplit would take 'a' for the
    password of http://u:a#b@h and 'b@h' for a fragment)."""
    from tasks.storage import credentials_to_mlflow

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # so that the teardown restores (removes) what a test sets
    for pw in ("a#b?c/d@e", "x?y", "p#q"):
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        assert credentials_to_mlflow(f"https://ops:{pw}@mlflow.example:5000") == \
            "https://mlflow.example:5000"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == pw
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops"


class _FakeClient:
    """Records the URI an MLflow client was opened with, and fails as a database would."""

    opened: ClassVar[list[str]] = []

    def __init__(self, tracking_uri=None, registry_uri=None):
        self.opened.append(tracking_uri)

    def get_experiment_by_name(self, name):
        from mlflow.exceptions import MlflowException

        raise MlflowException("could not connect")


def test_a_database_uri_keeps_its_password_for_mlflow_and_shows_none(monkeypatch):
    """MLflow has no password variable for a database store: the client connects with the URI
    as given (password and all), while the config, the resolved tracking URI and every error
    carry it without the credentials."""
    import mlflow

    from tasks.errors import TrackingError
    from tasks.registry.config import RegistryConfig
    from tasks.registry.session import _fluent_tracking_uri, _mlflow
    from tasks.runtime import RuntimeConfig
    from tasks.tracking import ensure_experiment, tracking_uri

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # so that the teardown restores (removes) what a test sets
        monkeypatch.delenv(var)
    full = "postgresql://mlflow:s3cr#t?x@db.example:5432/mlflow"
    shown = "postgresql://db.example:5432/mlflow"
    rt = RuntimeConfig(mlflow_uri=full)
    assert rt.mlflow_uri == shown and "s3cr" not in rt.model_dump_json()
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # not an HTTP server's login
    uri = tracking_uri(rt, None)
    assert uri == shown
    monkeypatch.setattr(mlflow, "MlflowClient", _FakeClient)
    _FakeClient.opened.clear()
    with pytest.raises(TrackingError) as err:
        ensure_experiment(uri)
    assert _FakeClient.opened == [full]
    assert "s3cr" not in str(err.value) and shown in str(err.value)
    with _mlflow(uri, RegistryConfig(), "look"):
        pass
    assert _FakeClient.opened[-1] == full
    with _fluent_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == full
    # the same URI with other credentials in the environment is not this one's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://x:y@other.example/mlflow")
    ensure_experiment_uri = "postgresql://other.example/mlflow"
    with pytest.raises(TrackingError):
        ensure_experiment(shown)
    assert _FakeClient.opened[-1] == shown
    with pytest.raises(TrackingError):
        ensure_experiment(ensure_experiment_uri)
    assert _FakeClient.opened[-1] == "postgresql://x:y@other.example/mlflow"

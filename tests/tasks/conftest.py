"""Fixtures shared by the stage tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory, ray_local):
    """The embedded digits, preprocessed once for the session (copied by :func:`digits_root`)."""
    from flows.config import load_config
    from tasks.preprocess import preprocess

    root = tmp_path_factory.mktemp("digits-dataset")
    cfg = load_config(root=str(root))
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
    return root


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory, digits_dataset):
    """A storage root holding the preprocessed digits dataset (one per test module, so a
    module's runs, MLflow store and evaluations never meet another module's)."""
    root = tmp_path_factory.mktemp("digits-root")
    shutil.copytree(digits_dataset / "datasets", root / "datasets")
    return root

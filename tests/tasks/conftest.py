"""Fixtures shared by the stage tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory, ray_local):
    """A storage root holding the preprocessed digits dataset (one per test module, so a
    module's runs, MLflow store and evaluations never meet another module's)."""
    from flows.config import load_config
    from tasks.preprocess import preprocess

    root = tmp_path_factory.mktemp("digits-root")
    cfg = load_config(root=str(root))
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
    return root

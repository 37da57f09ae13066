"""The preprocess flow and CLI under Prefect's test harness, on the session's local Ray."""

from __future__ import annotations

from tests.helpers import invoke


def test_cli_preprocess_prints_version_counts_and_manifest(ray_local, prefect_harness, tmp_path):
    args = ["preprocess", "--root", str(tmp_path), "--set", "data.val_fraction=0.2"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "dataset digits version " in result.output and "(committed)" in result.output
    # 1797 images, 324 of them on the val side at 0.2 and 271 on the test side at the default
    # 0.15 (tests/tasks/test_digits_and_images.py)
    assert "1202 train, 324 val, 271 test, 0 skipped; shape (1, 8, 8), 10 classes" in result.output
    manifest = next(tmp_path.glob("datasets/digits/*/_manifest.json"))
    assert f"manifest: {manifest}" in result.output
    again = invoke(args)
    assert again.exit_code == 0 and "already committed, reused" in again.output, again.output


def test_flow_returns_the_dataset_reference(ray_local, prefect_harness, tmp_path):
    from flows.config import load_config
    from flows.preprocess import preprocess_flow

    cfg = load_config(root=str(tmp_path))
    ref = preprocess_flow(cfg.to_json_dict())
    assert ref["name"] == "digits" and ref["train"] + ref["val"] + ref["test"] == 1797
    assert ref["manifest_uri"].endswith("_manifest.json") and ref["shape"] == [1, 8, 8]


def test_cli_error_in_the_config_is_one_clear_line(tmp_path):
    """Refused while reading the config: before Prefect or Ray."""
    result = invoke(["preprocess", "--root", str(tmp_path), "--set", "data.resolutoin=3"])
    assert result.exit_code == 2
    assert "unknown config key 'data.resolutoin'" in result.output
    assert "Traceback" not in result.output


def test_cli_error_in_the_stage_is_one_clear_line(ray_local, prefect_harness, tmp_path):
    result = invoke(["preprocess", "--root", str(tmp_path), "--set", "data.source=/no/such/dir"])
    assert result.exit_code == 1
    assert "data.source /no/such/dir does not exist" in result.output
    assert "Traceback" not in result.output


def test_help_lists_preprocess():
    result = invoke(["preprocess", "--help"])
    assert result.exit_code == 0 and "--set" in result.output and "--root" in result.output

"""`diffusion-pipeline train` under Prefect's test harness, on the session's local Ray."""

from __future__ import annotations

import pytest
from test_preprocess_flow import invoke

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "train.batch_size=16", "train.warmup_steps=1",
    "train.checkpoint_every=4", "train.log_every=2", "train.steps=4", "diffusion.T=50",
]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def test_cli_train_prints_run_and_checkpoint(ray_local, prefect_harness, tmp_path):
    missing = invoke(["train", "--root", str(tmp_path), *sets(*TINY)])
    assert missing.exit_code == 1
    assert "no committed version of dataset 'digits'" in missing.output
    assert "diffusion-pipeline preprocess" in missing.output

    assert invoke(["preprocess", "--root", str(tmp_path)]).exit_code == 0
    result = invoke(["train", "--root", str(tmp_path), *sets(*TINY)])
    assert result.exit_code == 0, result.output
    assert "step 4, loss" in result.output and "checkpoint: " + str(tmp_path) in result.output

    bad = invoke(["train", "--root", str(tmp_path), *sets(*TINY, "model.resolution=16")])
    assert bad.exit_code == 1 and "model.resolution=16 does not match" in bad.output
    assert "Traceback" not in bad.output

"""`diffusion-pipeline train` under Prefect's test harness, on the session's local Ray."""

from __future__ import annotations

import pytest

from tests.helpers import invoke

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

    # evaluate finds the finished run the same config names, prints the table; a second call
    # reads the stored evaluation
    EVAL = ["evaluate.num_samples=20", "evaluate.frontier=[ddim:5,ddim:10]",
            "evaluate.nll_images=4", "evaluate.reference_steps=20"]
    ev = invoke(["evaluate", "--root", str(tmp_path), *sets(*TINY, *EVAL)])
    assert ev.exit_code == 0, ev.output
    assert "| FD (reference net) at default sampler (20 samples) |" in ev.output
    assert "NLL bits/dim" in ev.output and "| ddim | 10 |" in ev.output
    assert f"stored: {tmp_path}/evaluations/" in ev.output
    again = invoke(["evaluate", "--root", str(tmp_path), *sets(*TINY, *EVAL)])
    assert again.exit_code == 0 and "(reused)" in again.output

    none = invoke(["evaluate", "--root", str(tmp_path), *sets(*TINY, *EVAL, "train.steps=5")])
    assert none.exit_code == 1 and "does not exist" in none.output
    assert "diffusion-pipeline train" in none.output and "Traceback" not in none.output

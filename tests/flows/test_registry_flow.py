"""`diffusion-pipeline register | promote | rollback` end to end under Prefect's test harness:
two trained runs, each evaluated and registered, the promotion gate, rollback, and loading the
champion back through the registry."""

from __future__ import annotations

import pytest

from tests.helpers import invoke

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
    "model.attention_resolutions=[]", "train.batch_size=32", "train.warmup_steps=1",
    "train.checkpoint_every=200", "train.log_every=50", "diffusion.T=50",
    "evaluate.num_samples=40", "evaluate.frontier=[ddim:5,ddim:10]", "evaluate.nll_images=4",
    "evaluate.reference_steps=100",
]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def test_register_promote_rollback_and_load_the_champion(ray_local, prefect_harness, tmp_path):
    root = ["--root", str(tmp_path)]
    assert invoke(["preprocess", *root]).exit_code == 0

    nothing = invoke(["promote", *root, *sets(*TINY)])
    assert nothing.exit_code == 1
    assert "no registered model named 'digits-diffusion'; registered: none" in nothing.output

    weak = sets(*TINY, "train.steps=2")
    assert invoke(["train", *root, *weak]).exit_code == 0
    reg = invoke(["register", *root, *weak])
    assert reg.exit_code == 0, reg.output
    assert "registered digits-diffusion version 1 (@challenger): models:/digits-diffusion/1" \
        in reg.output
    # the training run now holds the evaluation (metrics and table) beside its curves
    from mlflow import MlflowClient

    from tasks.registry import resolve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = resolve("models:/digits-diffusion/1", uri)["tags"]
    run = MlflowClient(uri).get_run(tags["training.mlflow_run_id"])
    assert "eval.fd" in run.data.metrics and "eval.nll_bpd" in run.data.metrics
    assert tags["dataset.version"] and tags["checkpoint.uri"].startswith(str(tmp_path))
    arts = [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "evaluation")]
    assert arts == [f"evaluation/{tags['eval.key']}.md"]

    first = invoke(["promote", *root, *weak])
    assert first.exit_code == 0, first.output
    assert "v1 promoted: first champion" in first.output and "champion: v1" in first.output

    strong = sets(*TINY, "train.steps=200")
    assert invoke(["train", *root, *strong]).exit_code == 0
    reg2 = invoke(["register", *root, *strong])
    assert reg2.exit_code == 0 and "version 2 (@challenger)" in reg2.output, reg2.output
    second = invoke(["promote", *root, *strong])
    assert second.exit_code == 0, second.output
    assert "v2 promoted: fd" in second.output and "champion: v2" in second.output

    back = invoke(["rollback", *root, *strong])
    assert back.exit_code == 0, back.output
    assert "champion moved back from v2 to v1" in back.output

    # the champion loads through the registry (digest-checked) and evaluates on the same key
    ev = invoke(["evaluate", *root, *sets(*TINY), "--model", "models:/digits-diffusion@champion"])
    assert ev.exit_code == 0, ev.output
    assert "(reused)" in ev.output  # v1's weights were evaluated under this key at register

    missing = invoke(["evaluate", *root, *sets(*TINY), "--model", "models:/digits-diffusion@gold"])
    assert missing.exit_code == 1 and "champion" in missing.output and "Traceback" not in \
        missing.output

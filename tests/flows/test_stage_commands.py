"""The stage commands one after another on one storage root, under Prefect's test harness and
the session's local Ray: `diffusion-pipeline preprocess | train | evaluate | register | promote |
rollback`. Two trained runs, a weak and a strong one: what each command prints, its errors in
one clear line, the stored evaluation reused by `register`, the promotion gate, rollback, and
loading the champion back through the registry."""

from __future__ import annotations

from tests.helpers import TINY_UNET, invoke, sets

TINY = [
    *TINY_UNET, "train.batch_size=32", "train.warmup_steps=1", "train.checkpoint_every=200",
    "train.log_every=50", "diffusion.T=50", "evaluate.num_samples=150",
    "evaluate.frontier=[ddim:5,ddim:10]", "evaluate.nll_images=4", "evaluate.reference_steps=100",
]


def test_train_evaluate_register_promote_rollback_and_load_the_champion(
        ray_local, prefect_harness, tmp_path):
    root = ["--root", str(tmp_path)]
    weak = sets(*TINY, "train.steps=4")

    # before any dataset: `train` says how to make one; before any version: `promote` says so
    missing = invoke(["train", *root, *weak])
    assert missing.exit_code == 1
    assert "no committed version of dataset 'digits'" in missing.output
    assert "diffusion-pipeline preprocess" in missing.output
    nothing = invoke(["promote", *root, *sets(*TINY)])
    assert nothing.exit_code == 1
    assert "no registered model named 'digits-diffusion'; registered: none" in nothing.output

    assert invoke(["preprocess", *root]).exit_code == 0
    result = invoke(["train", *root, *weak])
    assert result.exit_code == 0, result.output
    assert "step 4, loss" in result.output and "checkpoint: " + str(tmp_path) in result.output

    bad = invoke(["train", *root, *sets(*TINY, "train.steps=4", "model.resolution=16")])
    assert bad.exit_code == 1 and "model.resolution=16 does not match" in bad.output
    assert "Traceback" not in bad.output

    # evaluate finds the finished run the same config names, prints the table; a second call
    # reads the stored evaluation
    ev = invoke(["evaluate", *root, *weak])
    assert ev.exit_code == 0, ev.output
    assert "| FD (reference net) at default sampler (150 samples) |" in ev.output
    assert "NLL bits/dim" in ev.output and "| ddim | 10 |" in ev.output
    assert f"stored: {tmp_path}/evaluations/" in ev.output
    again = invoke(["evaluate", *root, *weak])
    assert again.exit_code == 0 and "(reused)" in again.output

    none = invoke(["evaluate", *root, *sets(*TINY, "train.steps=5")])
    assert none.exit_code == 1 and "does not exist" in none.output
    assert "diffusion-pipeline train" in none.output and "Traceback" not in none.output

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

    # a 4-step model is noise: far above the real-vs-real floor, it is not the first champion
    refused = invoke(["promote", *root, *weak])
    assert refused.exit_code == 0, refused.output
    assert "v1 not promoted: v1 fd_matched " in refused.output and " × eval.fd_floor " in \
        refused.output and "champion: none" in refused.output
    # an operator's looser floor rule is another policy: v1 is judged again, and promoted
    loose = sets("registry.max_fd_over_floor=1000")
    first = invoke(["promote", *root, *weak, *loose])
    assert first.exit_code == 0, first.output
    assert "v1 promoted: first champion" in first.output and "champion: v1" in first.output

    strong = sets(*TINY, "train.steps=200")
    assert invoke(["train", *root, *strong]).exit_code == 0
    reg2 = invoke(["register", *root, *strong])
    assert reg2.exit_code == 0 and "version 2 (@challenger)" in reg2.output, reg2.output
    second = invoke(["promote", *root, *strong, *loose])
    assert second.exit_code == 0, second.output
    assert "v2 promoted: fd" in second.output and "champion: v2" in second.output

    back = invoke(["rollback", *root, *strong])
    assert back.exit_code == 0, back.output
    assert "champion moved back from v2 to v1" in back.output

    # the champion loads through the registry (digest-checked) and evaluates on the same key
    ev = invoke(["evaluate", *root, *sets(*TINY), "--model", "models:/digits-diffusion@champion"])
    assert ev.exit_code == 0, ev.output
    assert "(reused)" in ev.output  # v1's weights were evaluated under this key before

    missing = invoke(["evaluate", *root, *sets(*TINY), "--model", "models:/digits-diffusion@gold"])
    assert missing.exit_code == 1 and "champion" in missing.output and "Traceback" not in \
        missing.output

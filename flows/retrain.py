"""The ``retrain`` flow: the whole pipeline as one Prefect flow run.

    preflight → preprocess → train → evaluate → register → promote → generate (optional)

Each stage is a flow of its own (:mod:`flows.preprocess`, :mod:`flows.train`, ...), called here as
a subflow, so the Prefect UI shows one run per stage under the retrain run, with its logs.

Stages whose inputs did not change do no work: the dataset version is a fingerprint of the
source listing and the preprocessing settings, the training run's name a fingerprint of that
version and the training config, an evaluation is stored under the weights' digest and the eval
settings, a registered version is found again by its weights' digest, and a generation job is
named by its settings. A scheduled run on unchanged data and config therefore costs seconds,
and a run that died half-way continues where it stopped (training resumes from its latest
checkpoint; a generation job writes only its missing shards).

Each run leaves two Prefect artifacts: ``retrain-summary`` (markdown: dataset, training,
evaluation table, promotion decision, samples) and ``retrain-samples`` (the sample grid).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow, task

from flows.config import PipelineConfig, with_overrides
from flows.evaluate import evaluate_flow
from flows.generate import generate_flow
from flows.preprocess import preprocess_flow
from flows.registry import promote_flow, register_flow, require_selection_split
from flows.retry import transient_retries
from flows.train import train_flow
from tasks.evaluate.result import with_interval
from tasks.storage import redact, redact_all

STAGES = ("preflight", "preprocess", "train", "evaluate", "register", "promote", "generate")


class Stages:
    """Per-stage timing and outcome, printed as each stage starts and ends."""

    def __init__(self, total: int):
        self.total = total
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"stage": name, "status": "done", "detail": ""}
        print(f"[{len(self.records) + 1}/{self.total}] {name} ...")
        t0 = time.perf_counter()
        try:
            yield record
        except BaseException:
            record["status"] = "failed"
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 1)
            self.records.append(record)
        print(f"[{len(self.records)}/{self.total}] {name} {record['status']} in "
              f"{record['seconds']:.1f} s" + (f": {record['detail']}" if record["detail"] else ""))

    def skip(self, name: str, why: str) -> None:
        self.records.append({"stage": name, "status": "skipped", "detail": why, "seconds": 0.0})
        print(f"[{len(self.records)}/{self.total}] {name} skipped: {why}")


@task(name="preflight", **transient_retries())
def preflight_task(config: PipelineConfig) -> dict:
    """Fail in seconds, not after hours of training: the training settings hold together, the
    storage root answers and refuses a second create-only write of one key (exactly-once commits
    rely on it), and MLflow answers (a SQLite store and the experiment are created here on first
    use)."""
    from tasks import tracking
    from tasks.storage import check_bucket, check_exclusive_create
    from tasks.train import check_config

    check_config(config.train, config.diffusion)
    root = config.runtime.root_location()
    t0 = time.perf_counter()
    check_bucket(root)
    check_exclusive_create(root.child("_probe"))  # probes under the root itself
    storage_s = time.perf_counter() - t0
    uri = tracking.tracking_uri(config.runtime, root)
    t0 = time.perf_counter()
    tracking.ensure_experiment(uri)
    return {"root": root.describe(), "tracking_uri": uri,
            "storage_check_s": round(storage_s, 2),
            "mlflow_start_s": round(time.perf_counter() - t0, 2)}


@task(name="sample-grid", **transient_retries())
def grid_task(generation: dict, config: PipelineConfig, mlflow_run_id: str | None,
              tracking_uri: str) -> str:
    """Draw ``grid.png`` beside the generated samples, attach it to the training run in MLflow
    and to this flow run as the ``retrain-samples`` artifact; returns its URI."""
    import io

    from PIL import Image
    from prefect.artifacts import create_markdown_artifact

    from tasks.generate import write_grid

    uri, png = write_grid(generation["output"], config.runtime)
    if mlflow_run_id:
        from mlflow import MlflowClient

        from tasks.tracking import connect_uri, explained

        with explained(tracking_uri):
            MlflowClient(tracking_uri=connect_uri(tracking_uri)).log_image(
                mlflow_run_id, Image.open(io.BytesIO(png)), "samples/generated-grid.png")
    text = (f"{generation['num_samples']} samples of `{generation['model_ref']}`, one row per "
            f"class. File: `{uri}`")
    if len(png) < 2**20:  # small enough to carry inline
        text = f"![samples](data:image/png;base64,{base64.b64encode(png).decode()})\n\n{text}"
    create_markdown_artifact(key="retrain-samples", markdown=text,
                             description="A grid of the generated samples")
    return uri


@flow(name="retrain", log_prints=True)
def retrain_flow(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    generate: bool = True,
    overrides: list[str] | None = None,
) -> dict:
    """Preprocess → train → evaluate → register → promote → generate, skipping what is done.

    ``config`` is the whole pipeline config (:class:`~flows.config.PipelineConfig`; a partial
    mapping takes the defaults for the rest). ``overrides`` are ``section.key=value`` changes
    applied on top of it: the way to change one setting of a deployment's config for one run.
    ``generate=False`` stops after the promotion. Returns a summary: per-stage status and
    seconds, the dataset, the run, the evaluation, the registered version and the promotion
    decision, the generation job and its grid.
    """
    started = time.time()
    cfg = with_overrides(config, overrides)
    require_selection_split(cfg)  # it registers and promotes: never on the locked test split
    stages = Stages(len(STAGES) if generate else len(STAGES) - 1)
    out: dict[str, Any] = {"started_at": started}

    with stages.stage("preflight") as st:
        pre = preflight_task(cfg)
        out |= {"root": pre["root"], "tracking_uri": pre["tracking_uri"],
                "mlflow_start_s": pre["mlflow_start_s"]}
        st["detail"] = f"storage root {pre['root']}, MLflow {redact(pre['tracking_uri'])}"

    with stages.stage("preprocess") as st:
        ds = preprocess_flow(cfg)
        out["dataset"] = ds
        st["status"] = "reused" if ds["reused"] else "done"
        st["detail"] = (f"{ds['name']}@{ds['version']}: {ds['train']} train, {ds['val']} val, "
                        f"{ds['skipped']} skipped")
    # later stages use exactly this version, even if another run commits a newer one meanwhile
    pinned = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"version": ds["version"]})})

    with stages.stage("train") as st:
        run = train_flow(pinned)
        out["train"] = run
        m = run["metrics"]
        st["status"] = "reused" if run.get("reused") else "done"
        resumed = m.get("resumed_from") or 0
        st["detail"] = (f"run {run['run_name']} at step {m['step']}, loss "
                        f"{m.get('loss', float('nan')):.4f}"
                        + (f" (resumed from step {resumed})" if resumed and not run.get("reused")
                           else ""))

    with stages.stage("evaluate") as st:
        ev = evaluate_flow(pinned, model=run["checkpoint_uri"], dataset_version=ds["version"])
        out["evaluation"] = ev
        d = ev["default_sampler"]
        st["status"] = "reused" if ev.get("reused") else "done"
        st["detail"] = (f"fd {with_interval(ev['metrics'], 'fd')} at {d['name']}:{d['steps']}, "
                        f"nll {with_interval(ev['metrics'], 'nll_bpd')} bits/dim")

    with stages.stage("register") as st:
        reg = register_flow(pinned)
        out["registered"] = {k: v for k, v in reg.items() if k != "evaluation"}
        st["status"] = "done" if reg.get("new", True) else "reused"
        st["detail"] = f"{reg['name']} v{reg['version']}"

    with stages.stage("promote") as st:
        pro = promote_flow(pinned, version=reg["version"])
        out["promotion"] = pro
        st["status"] = ("promoted" if pro["promoted"] else "reused"
                        if pro.get("champion") == reg["version"] else "rejected")
        st["detail"] = pro["reason"]

    if generate and pro.get("champion") is None:
        stages.skip("generate", f"{reg['name']} has no champion to sample from")
    elif generate:
        with stages.stage("generate") as st:
            gen = generate_flow(pinned)
            grid = grid_task(gen, pinned, run.get("mlflow_run_id"), out["tracking_uri"])
            out["generation"] = gen | {"grid": grid}
            st["status"] = "reused" if gen["reused"] else "done"
            st["detail"] = f"{gen['num_samples']} samples → {gen['output']}; grid {grid}"

    from tasks import runtime

    out["stages"] = stages.records
    out["ray_start_s"] = round(runtime.ray_start_seconds or 0.0, 2)
    out["seconds"] = round(time.time() - started, 1)
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="retrain-summary", markdown=summary_markdown(redact_all(out)),
                             description="Dataset, training, evaluation, promotion, samples")
    return out


def summary_markdown(out: dict) -> str:
    """The run as markdown: stages, dataset, training, evaluation table, promotion, samples."""
    from tasks.evaluate import table

    lines = ["# Retrain", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {r['detail']} |"
              for r in out["stages"]]
    ds = out.get("dataset")
    if ds:
        lines += ["", "## Dataset", "",
                  f"`{ds['name']}` version `{ds['version']}`: {ds['train']} train, {ds['val']} "
                  f"val, {ds['skipped']} skipped; shape {tuple(ds['shape'])}, "
                  f"{len(ds['class_names'])} classes. Manifest: `{ds['manifest_uri']}`"]
    run = out.get("train")
    if run:
        m = run["metrics"]
        lines += ["", "## Training", "",
                  f"Run `{run['run_name']}`: step {m['step']}, loss "
                  f"{m.get('loss', float('nan')):.4f}, {m.get('images_per_s', 0):.0f} images/s "
                  f"at the end" + (" (already finished; not retrained)" if run.get("reused")
                                   else "") + f". Checkpoint `{run['checkpoint_uri']}`."]
    ev = out.get("evaluation")
    if ev:
        lines += ["", "## Evaluation", "", table(ev)]
    pro = out.get("promotion")
    if pro:
        reg = out["registered"]
        verdict = "promoted to @champion" if pro["promoted"] else "not promoted"
        lines += ["", "## Registry", "",
                  f"`{reg['model_uri']}` {verdict}: {pro['reason']}. Champion: "
                  + (f"v{pro['champion']}." if pro.get("champion") else "none.")]
    gen = out.get("generation")
    if gen:
        lines += ["", "## Samples", "",
                  f"{gen['num_samples']} samples of `{gen['model_ref']}` with "
                  f"{gen['sampler']['name']}:{gen['sampler']['steps']} in `{gen['output']}`; "
                  f"grid `{gen['grid']}`."]
    lines += ["", f"MLflow: `{redact(out['tracking_uri'])}`. Total {out['seconds']:.1f} s."]
    return "\n".join(lines)

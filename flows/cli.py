"""``diffusion-pipeline``: the command line. Each pipeline stage adds its sub-command here."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import typer

# The embedded (ephemeral) Prefect server's telemetry heartbeat races its own SQLite database at
# start-up ("database is locked", PrefectHQ/prefect#15170) and phones home; off unless asked.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    name="diffusion-pipeline",
    help="Train, evaluate, register and sample denoising diffusion models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def demo(
    out: Path = typer.Option(Path("pipeline-data/demo"), help="Where to write the grid and model."),
    steps: int = typer.Option(1500, min=1, help="Training steps (batch 128)."),
    seed: int = typer.Option(0, help="Seed for initialisation, batches and samples."),
) -> None:
    """Train a small diffusion model on the embedded digits and write a PNG grid of samples."""
    from flows.demo import DemoConfig, run_demo

    run_demo(out, DemoConfig(steps=steps, seed=seed), log=typer.echo)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with pipeline config sections.")
SetOpt = typer.Option(
    None, "--set", "-s", help="Override one key: section.key=value (repeatable)."
)
RootOpt = typer.Option(None, "--root", help="Storage root: a local path or s3://bucket/prefix.")
DebugOpt = typer.Option(False, "--debug", help="Show full stack traces on errors.")


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2 if type(e).__name__ == "ConfigError" else 1)


_EXPECTED = ("ConfigError", "PreprocessError", "StorageError", "DatasetNotFound",
             "TrainConfigError", "TrainingDiverged", "RunNotFound", "EvalError",
             "WeightsIntegrityError", "RegistryError", "RegistryUnavailable", "TrackingError",
             "LeaseBusy", "GenerateError")


# sub-command → its Prefect flow
_FLOWS = {
    "preprocess": "flows.preprocess:preprocess_flow",
    "train": "flows.train:train_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "register": "flows.registry:register_flow",
    "promote": "flows.registry:promote_flow",
    "rollback": "flows.registry:rollback_flow",
    "generate": "flows.generate:generate_flow",
}


def _run_stage(config: Path | None, sets: list[str] | None, root: str | None, debug: bool,
               flow_name: str, **kwargs):
    """Load the config and run one stage's flow; expected errors become one red line."""
    try:
        from flows.config import load_config

        cfg = load_config(config, sets or [], root)
        module, name = _FLOWS[flow_name].split(":")
        stage_flow = getattr(importlib.import_module(module), name)  # imported when used
        return stage_flow(cfg.to_json_dict(), **kwargs)
    except Exception as e:
        if type(e).__name__ not in _EXPECTED and not debug:
            typer.secho(f"error: {type(e).__name__}: {e} (rerun with --debug for the trace)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None
        _fail(e, debug)


@app.command()
def preprocess(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Turn data.source into a versioned Parquet dataset under ROOT/datasets/<name>/<version>/."""
    ref = _run_stage(config, set_, root, debug, "preprocess")
    state = "already committed, reused" if ref["reused"] else "committed"
    typer.echo(
        f"dataset {ref['name']} version {ref['version']} ({state}): {ref['train']} train, "
        f"{ref['val']} val, {ref['skipped']} skipped; shape {tuple(ref['shape'])}, "
        f"{len(ref['class_names'])} classes"
    )
    typer.echo(f"manifest: {ref['manifest_uri']}")


@app.command()
def train(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Train on the latest committed version of data.name with Ray Train (resumes a run name)."""
    res = _run_stage(config, set_, root, debug, "train")
    m = res["metrics"]
    typer.echo(f"run {res['run_name']}: step {m['step']}, loss {m.get('loss', float('nan')):.4f}"
               f" on {res['dataset']['name']}@{res['dataset']['version']}")
    typer.echo(f"checkpoint: {res['checkpoint_uri']}")


ModelOpt = typer.Option(
    None, "--model", "-m", help="models:/<name>@<alias>, models:/<name>/<version>, or a "
    "checkpoint / model directory URI. Default: the finished training run the config names.")


@app.command()
def evaluate(
    model: str = ModelOpt,
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Evaluate a model: NLL (bits/dim), Fréchet distance with its floor, memorization, and the
    sampler quality-vs-cost frontier; prints the table."""
    from tasks.evaluate import table

    res = _run_stage(config, set_, root, debug, "evaluate", model=model)
    typer.echo(table(res))
    typer.echo(f"stored: {res['stored_at']}" + (" (reused)" if res["reused"] else ""))


@app.command()
def register(
    model: str = typer.Option(None, "--model", "-m", help="A training checkpoint URI. Default: "
                              "the finished training run the config names."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Evaluate a trained model (reusing a stored evaluation) and register it in MLflow as a new
    version of registry.model_name with the `challenger` alias."""
    res = _run_stage(config, set_, root, debug, "register", model=model)
    ev = res["evaluation"]
    d = ev["default_sampler"]
    typer.echo(f"registered {res['name']} version {res['version']} (@challenger): "
               f"{res['model_uri']}")
    typer.echo(f"  fd {ev['metrics']['fd']:.3f} at {d['name']}:{d['steps']} (the model's default "
               f"sampler); weights sha256 {res['weights_sha256'][:16]}")
    typer.echo(f"  tracking: {res['tracking_uri']}")


@app.command()
def promote(
    version: str = typer.Option(None, "--version", "-v", help="The version to promote. "
                                "Default: the one with the `challenger` alias."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Move `champion` to the challenger if it beats the champion by registry.margin on
    registry.metric (the first champion must pass registry.thresholds)."""
    res = _run_stage(config, set_, root, debug, "promote", version=version)
    verdict = "promoted" if res["promoted"] else "not promoted"
    typer.echo(f"{res['name']} v{res['challenger']} {verdict}: {res['reason']}")
    typer.echo(f"  champion: v{res['champion']}" if res["champion"] else "  champion: none")


@app.command()
def rollback(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Move `champion` back to the version that held it before."""
    res = _run_stage(config, set_, root, debug, "rollback")
    typer.echo(f"{res['name']}: champion moved back from v{res['previous']} to "
               f"v{res['champion']}")


@app.command()
def generate(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Generate generate.num_samples samples from generate.model (default: the registry's
    champion) on Ray Data into generate.output; a killed job resumes, a complete one is reused."""
    res = _run_stage(config, set_, root, debug, "generate")
    state = "already complete, reused" if res["reused"] else (
        f"{res['shards_written']} shard(s) written")
    rate = f", {res['images_per_s']:.1f} images/s" if res.get("images_per_s") else ""
    typer.echo(f"generation job {res['job_id']} ({state}): {res['num_samples']} samples of "
               f"{res['model_ref']} with {res['sampler']['name']}:{res['sampler']['steps']} in "
               f"{res['shards']} shard(s){rate}")
    typer.echo(f"manifest: {res['manifest_uri']}")


@app.callback()
def _root() -> None:
    """Pipeline stages as sub-commands; see each one's --help."""


def main() -> None:
    app(prog_name="diffusion-pipeline")


if __name__ == "__main__":
    main()

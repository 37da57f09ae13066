"""``diffusion-pipeline``: the command line. Each pipeline stage adds its sub-command here."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import time
from pathlib import Path
from typing import NoReturn

import typer

# The embedded (ephemeral) Prefect server's telemetry heartbeat races its own SQLite database at
# start-up ("database is locked", PrefectHQ/prefect#15170) and phones home; off unless asked.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Without PREFECT_API_URL, Prefect starts that server in a subprocess and gives it 20 s to answer.
# Its first start creates and migrates the SQLite database; on a busy 2-core machine that took
# longer and the run failed before its first stage ("Timed out while attempting to connect to
# ephemeral Prefect API server"). Two minutes, unless set.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

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


def exit_code(e: BaseException) -> int | None:
    """The exit code for an expected error: 2 for a config the pipeline cannot build (like a
    command-line usage error), 1 for any other pipeline error (tampered weights included);
    None for an unexpected one (a bug, or a failure the stages do not explain)."""
    from diffusion.serialization import WeightsIntegrityError
    from tasks.errors import ConfigError, PipelineError

    if isinstance(e, ConfigError):
        return 2
    if isinstance(e, PipelineError | WeightsIntegrityError):
        return 1
    return None


def _fail(e: BaseException, debug: bool) -> NoReturn:
    """Re-raise with ``--debug``; else one red line and the exit code: expected errors show
    their message alone, unexpected ones their type and a hint to rerun with ``--debug``."""
    if debug:
        raise e
    code = exit_code(e)
    if code is None:
        typer.secho(f"error: {type(e).__name__}: {e} (rerun with --debug for the trace)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and isinstance(e, type(cause)):
        e = cause  # Ray's RayTaskError(X): an X whose text is the worker's whole traceback
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


# sub-command → its Prefect flow
_FLOWS = {
    "run": "flows.retrain:retrain_flow",
    "preprocess": "flows.preprocess:preprocess_flow",
    "train": "flows.train:train_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "register": "flows.registry:register_flow",
    "promote": "flows.registry:promote_flow",
    "rollback": "flows.registry:rollback_flow",
    "generate": "flows.generate:generate_flow",
}


class _OneLineErrors(logging.Formatter):
    """Wraps a console formatter: log records keep their traceback for Prefect's API (the UI
    shows it), while the terminal shows the message alone; ``--debug`` shows everything."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _quiet_console() -> None:
    """No tracebacks on the terminal from Prefect's console handlers, and no Ray Data progress
    tables (each stage reports its own progress)."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.startswith("prefect")] + [logging.root]
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if type(h).__name__ == "PrefectConsoleHandler" and not isinstance(
                    h.formatter, _OneLineErrors):
                h.setFormatter(_OneLineErrors(h.formatter))
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines and progress tables (logged every few seconds when stdout is not a
    terminal, as in a Ray Job) off the console: its console handler keeps WARNING and above,
    its log file (``ray-data.log`` in the Ray session) keeps everything. The stages report
    their own progress."""
    import ray.data  # noqa: F401 - configures its loggers on import

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)


def _run_stage(config: Path | None, sets: list[str] | None, root: str | None, debug: bool,
               flow_name: str, **kwargs):
    """Load the config and run one stage's flow; expected errors become one red line."""
    try:
        from flows.config import load_config

        cfg = load_config(config, sets or [], root)
        module, name = _FLOWS[flow_name].split(":")
        stage_flow = getattr(importlib.import_module(module), name)  # imported when used
        if not debug:
            _quiet_console()
        return stage_flow(cfg, **kwargs)
    except Exception as e:
        _fail(e, debug)


@app.command()
def run(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    generate: bool = typer.Option(True, "--generate/--no-generate",
                                  help="Generate samples from the champion at the end."),
    summary_json: Path = typer.Option(None, "--summary-json",
                                      help="Also write the run's summary as JSON here."),
    debug: bool = DebugOpt,
) -> None:
    """The whole pipeline (the `retrain` flow): preprocess → train → evaluate → register →
    promote → generate. Stages whose inputs did not change are skipped; a run that died
    continues where it stopped. With no options: the embedded digits under ./pipeline-data."""
    import json

    from tasks.storage import redact_all

    started = time.time()
    res = _run_stage(config, set_, root, debug, "run", generate=generate)
    res["prefect_start_s"] = round(res["started_at"] - started, 1)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(redact_all(res), indent=2, default=str))
    typer.echo("")
    typer.echo(where_everything_is(res))


def where_everything_is(res: dict) -> str:
    """The end of ``run``: stage times, where each output lives, how to open the UIs."""
    import shutil
    import sys

    from tasks.storage import redact

    lines = [f"retrain finished in {res['seconds']:.0f} s:"]
    lines += [f"  {r['stage']:<10} {r['status']:<8} {r['seconds']:>6.1f} s" for r in res["stages"]]
    ds, run = res["dataset"], res["train"]
    lines += ["", "outputs:",
              f"  dataset      {ds['manifest_uri'].rsplit('/', 1)[0]}/",
              f"  checkpoint   {run['checkpoint_uri']}",
              f"  model        {res['registered']['model_uri']}"
              + (" (@champion)" if res["promotion"].get("champion") == res["registered"]["version"]
                 else f" (champion: v{res['promotion'].get('champion')})")]
    gen = res.get("generation")
    if gen:
        lines += [f"  samples      {gen['output']}/ ({gen['num_samples']})",
                  f"  sample grid  {gen['grid']}"]
    uri = res["tracking_uri"]
    bindir = Path(sys.executable).parent

    def tool(name: str) -> str:
        return shutil.which(name) or str(bindir / name)

    lines += ["", "open the UIs:"]
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        lines += [f"  MLflow   {tool('mlflow')} ui --backend-store-uri {uri} --port 5000"
                  "   → http://127.0.0.1:5000",
                  f"           (tracking database {db}, artifacts beside it in mlartifacts/)"]
    else:
        lines += [f"  MLflow   {redact(uri)}"]
    api = os.environ.get("PREFECT_API_URL")
    if api:
        lines += [f"  Prefect  {redact(api).removesuffix('/').removesuffix('/api')}"]
    else:
        lines += [f"  Prefect  {tool('prefect')} server start   → http://127.0.0.1:4200 "
                  "(the runs are in its local database)"]
    return "\n".join(lines)


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
        f"{ref['val']} val, {ref['test']} test, {ref['skipped']} skipped; shape "
        f"{tuple(ref['shape'])}, "
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
    replace_broken: bool = typer.Option(
        False, "--replace-broken-champion", help="Replace a champion whose registry.metric is "
        "not a number (NaN/inf: it cannot be compared with) by a version that passes "
        "registry.thresholds and registry.max_fd_over_floor; recorded on both versions. No "
        "effect while the champion has a number."),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    debug: bool = DebugOpt,
) -> None:
    """Move `champion` to the challenger if it beats the champion by registry.margin on
    registry.metric, judged on the paired interval of the difference (every candidate must
    pass registry.thresholds and registry.max_fd_over_floor). A version that was rolled back
    is promoted again only when named with --version."""
    res = _run_stage(config, set_, root, debug, "promote", version=version,
                     explicit=version is not None, replace_broken=replace_broken)
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


@app.command("config")
def show_config(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    root: str = RootOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
    debug: bool = DebugOpt,
) -> None:
    """Print the resolved config: the defaults, then --config, --set and --root, as the stages
    would get it. URLs are shown without credentials; the YAML can be given back to --config."""
    import json

    import yaml

    try:
        from flows.config import load_config

        cfg = load_config(config, set_ or [], root)
    except Exception as e:
        _fail(e, debug)
    from tasks.storage import redact_all

    shown = redact_all(cfg.to_json_dict())
    typer.echo(json.dumps(shown, indent=2) if as_json
               else yaml.safe_dump(shown, sort_keys=False, allow_unicode=True).rstrip())


@app.command("job-run", hidden=True)
def job_run(
    request: str = typer.Argument(..., help="URI of the job's request.json."),
    s3_endpoint_url: str = typer.Option(None, help="S3 endpoint for reading the request."),
) -> None:
    """Inside a Ray Job: run the stage the request names in this process and store its result
    (or its error) beside the request. The entrypoint of every stage's Ray Job (tasks.jobs)."""
    import json

    from tasks.code import check_same_code, describe
    from tasks.jobs import error_line, error_record
    from tasks.stages import run_stage
    from tasks.storage import (
        Location,
        StorageConfig,
        atomic_write_bytes,
        read_json,
        storage_options,
    )

    quiet_ray_data_console()
    options = StorageConfig(s3_endpoint_url=s3_endpoint_url)
    echo = lambda m: print(m, flush=True)  # noqa: E731 - the job's log is what the driver shows
    req: dict = {}
    try:  # reading the request and writing the result are part of the stage: storage may fail
        req = read_json(Location.of(request, storage_options(request, options)))
        # A job runs the cluster's code: never another release's request.
        check_same_code(req.get("code"), where=f"the {req.get('stage')} job's request")
        echo(f"running stage {req['stage']} ({req.get('name')}, attempt {req['attempt']}, "
             f"{describe(req['code'])})")
        result = run_stage(req["stage"], req["args"], echo=echo)
        out = req["result"]
        atomic_write_bytes(Location.of(out, storage_options(out, options)),
                           json.dumps(result, indent=2, default=str).encode())
    except BaseException as e:
        code = exit_code(e)
        if code is None:  # unexpected: the whole trace belongs in the job's log
            import traceback

            traceback.print_exc()
        record = error_record(e)
        if "error" in req:
            with contextlib.suppress(Exception):  # storage may be what failed: the line is enough
                out = req["error"]
                atomic_write_bytes(Location.of(out, storage_options(out, options)),
                                   json.dumps(record, indent=2).encode())
        echo(error_line(record))
        raise typer.Exit(code=1 if code is None else code) from None
    echo(f"stage {req['stage']} done")


@app.callback()
def _root() -> None:
    """Pipeline stages as sub-commands; see each one's --help."""


def _unwrapped(doc: str | None) -> str | None:
    """``doc`` with each paragraph on one line. Typer keeps a docstring's single line breaks in
    the command list and in the paragraphs after the first, so a docstring wrapped in the
    source would break mid-sentence on the terminal; one line per paragraph lets rich wrap it
    to the terminal's width."""
    if not doc:
        return doc
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _command in app.registered_commands:  # every command above: its help as rich should see it
    _command.help = _command.help or _unwrapped(_command.callback.__doc__)


def main() -> None:
    app(prog_name="diffusion-pipeline")


if __name__ == "__main__":
    main()

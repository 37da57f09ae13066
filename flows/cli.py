"""``diffusion-pipeline``: the command line. Each pipeline stage adds its sub-command here."""

from __future__ import annotations

from pathlib import Path

import typer

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


@app.callback()
def _root() -> None:
    """Keep sub-commands explicit even while there is only one."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

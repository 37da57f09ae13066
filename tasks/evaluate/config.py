"""The ``evaluate`` section of the pipeline config: what is measured, on how many samples and
seeds, with which sampler settings (the frontier), and where it runs (this process or a Ray
task)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.bounds import SECTION, Seed


def parse_setting(text: str) -> tuple[str, int]:
    """One ``evaluate.frontier`` entry, ``sampler:steps`` (e.g. ``ddim:10``) → (sampler, steps),
    checked against :class:`diffusion.samplers.SamplerConfig`."""
    from diffusion.samplers import SamplerConfig

    name, sep, steps = text.partition(":")
    if not sep or not steps.strip().isdigit():
        raise ValueError(f"evaluate.frontier entry {text!r} must be sampler:steps, e.g. ddim:10")
    try:
        SamplerConfig(name.strip(), steps=int(steps))
    except (KeyError, ValueError) as e:
        raise ValueError(f"evaluate.frontier entry {text!r}: {e}") from None
    return name.strip(), int(steps)


class EvalConfig(BaseModel):
    """The ``evaluate`` section."""

    model_config = SECTION

    num_samples: int = Field(
        1000, ge=2, description="Generated images per sampler setting: what the promotion "
        "gate judges (digits, benchmarks/gate_rates.py: at 1000, against the 324 held-out "
        "images, no other seed's model was promoted in 168 decisions of 4 models, about 10 "
        "independent ones, and the default beat a 200-step model in 56 of 56).")
    seed: Seed = Field(2024, description="Sample i uses noise stream (seed, i).")
    guidance_scale: float = Field(
        1.0, ge=0, description="Classifier-free guidance (conditional models; 1 = none). The "
        "samples' distance to the data grows with it on the digits (benchmarks/quality.py: FD "
        "-20% at 1.0 against 1.5); raise it for class fidelity over diversity.")
    frontier: list[str] = Field(
        default_factory=lambda: ["ddim:10", "dpmpp_2m:10", "dpmpp_2m:20"],
        min_length=1, description="Sampler settings as sampler:steps (each costs num_samples × "
        "NFE network calls; add e.g. ddim:50 to see where quality saturates).")
    tolerance: float = Field(0.1, ge=0, description="Default sampler: the cheapest within "
                             "(1 + tolerance) × the best distance.")
    nll_images: int = Field(16, ge=0, description="Val images for bits/dim (0: skip; T network "
                            "calls per image).")
    memorization_threshold: float = Field(0.05, gt=0, le=1, description="RMS pixel distance "
                                          "in (0, 1] below which a sample copies a training "
                                          "image.")
    inception_weights: str | None = Field(
        None, description="FID Inception-v3 weights (local .safetensors): FID instead of the "
        "reference network's distance.")
    bootstrap_draws: int = Field(
        1000, ge=0, description="Bootstrap resamples behind each FD's and the NLL's interval "
        "(0: none). A draw costs about 1 ms with the reference net's 64 features; with "
        "Inception's 2048, 4 ms against a reference of 5000+ images (kept fixed) but 1.5 s on "
        "a CPU against a smaller one (resampled too): use 0 or a few dozen there.")
    interval_level: float = Field(0.95, gt=0, lt=1, description="Confidence level of the "
                                  "intervals.")
    reference_steps: int = Field(600, ge=1, description="Training steps of the reference net.")
    max_real_images: int = Field(10_000, ge=2, description="Cap on real images per split used.")
    split: Literal["val", "test"] = Field(
        "val", description="The dataset split the samples are measured against. 'val' (the "
        "selection split) for everything that decides: the promotion gate, the default "
        "sampler, recipe and benchmark choices. 'test' (the locked split, data.test_fraction) "
        "only to report a model: registration refuses such an evaluation, and its eval key "
        "differs from the val one's.")
    batch_size: int = Field(250, ge=1, description="Images per sampling batch.")
    device: str = Field("auto", description="auto (CUDA when available), cpu or cuda[:N].")
    on_ray: bool = Field(
        False, description="Run the evaluation as one Ray task (on a GPU node with "
        "ray_gpus: 1) instead of in the calling process, the flow run. A stored result is "
        "still found without Ray.")
    ray_gpus: float = Field(0, ge=0, description="GPUs the Ray evaluation task asks for.")
    ray_cpus: float = Field(1, gt=0, description="CPUs the Ray evaluation task asks for.")

    @model_validator(mode="after")
    def _placement(self) -> EvalConfig:
        if self.ray_gpus and not self.on_ray:
            raise ValueError("evaluate.ray_gpus applies to an evaluation on Ray: set "
                             "evaluate.on_ray: true as well (or ray_gpus: 0)")
        return self

    @field_validator("frontier")
    @classmethod
    def _frontier(cls, v: list[str]) -> list[str]:
        seen = []
        for item in v:
            name, steps = parse_setting(item)
            if f"{name}:{steps}" not in seen:
                seen.append(f"{name}:{steps}")
        return seen

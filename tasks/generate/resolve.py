"""Settings + model → job: load the model a generation names and check every setting against
it before any work starts (driver side only; the sampler actors get the resolved job)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tasks.errors import GenerateError
from tasks.generate.config import GenerateConfig
from tasks.generate.job import Job
from tasks.models import load_model_ref
from tasks.runtime import RuntimeConfig

if TYPE_CHECKING:
    from diffusion.samplers import SamplerConfig


def resolve_job(cfg: GenerateConfig, runtime: RuntimeConfig, *, default_model: str | None = None,
                echo=print) -> tuple[Job, Any]:
    """Load the model and check every setting against it; returns (job, model)."""
    ref = cfg.model or default_model
    if not ref:
        raise GenerateError("generate.model is not set; give models:/<name>@champion, "
                            "models:/<name>/<version> or a checkpoint URI")
    loaded = load_model_ref(ref, runtime)
    model, config, defaults = loaded.model, loaded.config, loaded.defaults
    unet, T = config["unet"], config["diffusion"]["T"]
    conditional = unet.get("num_classes") is not None
    sampler = _sampler(cfg, ref, T, defaults, echo)
    labels = _labels(cfg, ref, unet, conditional)
    scale = _guidance_scale(cfg, ref, labels, conditional, defaults)
    job = Job(model_ref=ref, model_version=loaded.version, weights_sha256=loaded.weights_sha256,
              config={k: config[k] for k in ("unet", "diffusion", "class_names") if k in config},
              sampler=asdict(sampler), guidance_scale=scale, labels=labels, seed=cfg.seed,
              num_samples=cfg.num_samples, shard_size=cfg.shard_size, format=cfg.format,
              **_numerics(cfg, runtime, echo))
    return job, model


def _numerics(cfg: GenerateConfig, runtime: RuntimeConfig, echo) -> dict:
    """The device kind the sampler actors sample on (``cpu`` without generate.gpus_per_actor,
    whatever the host has) and generate.bf16 resolved (auto: on for GPU actors)."""
    device = gpu_kind(cfg, runtime, echo) if cfg.gpus_per_actor else "cpu"
    return {"device": device,
            "bf16": cfg.bf16 == "on" or (cfg.bf16 == "auto" and device != "cpu")}


def gpu_kind(cfg: GenerateConfig, runtime: RuntimeConfig, echo) -> str:
    """The kind of device a GPU sampler actor gets (:func:`tasks.generate.job.device_kind`),
    asked of the cluster by one task that holds what an actor holds. A job's actors must all
    have it (each checks), so a job runs on one GPU model."""
    import ray

    from tasks.generate.job import device_kind
    from tasks.runtime import ensure_ray

    ensure_ray(runtime, echo=echo)
    probe = ray.remote(device_kind).options(num_gpus=cfg.gpus_per_actor,
                                             num_cpus=cfg.cpus_per_actor)
    return ray.get(probe.remote(True))


def _sampler(cfg: GenerateConfig, ref: str, T: int, defaults: dict | None,
             echo) -> SamplerConfig:
    """generate.sampler/steps over the sampler the model records (its options kept only for
    the same sampler); a model that records none gets dpmpp_2m:20. Checked against T."""
    from diffusion.samplers import SamplerConfig

    recorded = (defaults or {}).get("sampler") or {}
    if defaults is None and not (cfg.sampler and cfg.steps):
        echo(f"{ref} records no default sampler (not a registered model): using "
             f"{cfg.sampler or 'dpmpp_2m'}:{cfg.steps or 20} unless generate.sampler/steps say")
    name = cfg.sampler or recorded.get("name") or "dpmpp_2m"
    steps = cfg.steps or (recorded.get("steps") if name == recorded.get("name") else None) or 20
    try:
        base = {k: v for k, v in recorded.items() if k not in ("name", "steps")} \
            if name == recorded.get("name") else {}
        sampler = SamplerConfig(name, steps=steps, **base)
        sampler.resolved_steps(T)
    except (KeyError, ValueError) as e:
        raise GenerateError(f"generate.sampler/steps {name}:{steps}: {e}") from None
    return sampler


def _labels(cfg: GenerateConfig, ref: str, unet: dict, conditional: bool) -> Any:
    """generate.labels resolved for the model: None (unconditional), a class id, or one weight
    per class (auto: uniform for a conditional model, none otherwise)."""
    labels: Any = cfg.labels
    if labels == "auto":
        labels = "uniform" if conditional else "none"
    if not conditional and labels != "none":
        raise GenerateError(f"generate.labels={cfg.labels!r} but {ref} is unconditional (no "
                            "classes); leave generate.labels unset or set it to none")
    if labels == "none":
        labels = None
    elif labels == "uniform":
        labels = [1.0] * unet["num_classes"]
    if isinstance(labels, int) and labels >= unet["num_classes"]:
        raise GenerateError(f"generate.labels={labels} but {ref} has classes 0.."
                            f"{unet['num_classes'] - 1}")
    if isinstance(labels, list) and len(labels) != unet["num_classes"]:
        raise GenerateError(f"generate.labels has {len(labels)} weights but {ref} has "
                            f"{unet['num_classes']} classes")
    return labels


def _guidance_scale(cfg: GenerateConfig, ref: str, labels: Any, conditional: bool,
                    defaults: dict | None) -> float | None:
    """generate.guidance_scale, else the model's recorded scale, else 1; None without labels
    (where only 1, meaning no guidance, is accepted)."""
    if labels is None:
        if cfg.guidance_scale is not None and cfg.guidance_scale != 1.0:
            raise GenerateError(
                f"generate.guidance_scale={cfg.guidance_scale} needs class labels and a "
                f"conditional model ({ref} is {'conditional' if conditional else 'not'}; labels "
                "are none); drop generate.guidance_scale or set generate.labels")
        return None
    return cfg.guidance_scale if cfg.guidance_scale is not None else \
        float((defaults or {}).get("guidance_scale", 1.0))

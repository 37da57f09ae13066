"""The batch generation stage: N samples from a model, on Ray Data, deterministic and resumable.

A job is ``(model weights, sampler, steps, guidance, labels, seed, N, shard size, format)``; its
fingerprint is the *job id*. Sample i draws its noise from ``SampleNoise(seed, [i])`` and its
label (when labels are drawn from a distribution) from the same (seed, i) stream, so sample i
depends on the job and i alone: not on the batch size, the number of actors, the shard it lands
in or the order shards run in. It is also what the registered pyfunc returns for
``{"seed": seed, "index": i, "label": label_i}``.

Output layout under ``generate.output`` (default ``ROOT/generations/<job id>``)::

    _job.json                    the job, written first (a different job here is refused)
    shards/shard-000000.parquet  samples [0, S), [S, 2S), ...: index, label, pixels (uint8 CHW)
    png/000000042.png            one file per sample when generate.format = parquet+png
    _manifest.json               committed last: the job, counts, the shard list

Ray Data runs ``from_items(missing shards) → map_batches(Sampler actors)``; each actor loads
the model once (weights travel through the object store as safetensors bytes, never pickle)
and writes whole shards atomically, so a shard file that exists is complete. A job killed
part-way and started again writes only the missing shards; a complete job returns its manifest
without starting Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import GenerateError
from tasks.faults import maybe_die
from tasks.models import load_model_ref
from tasks.pixels import read_pixel_files
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import Location, atomic_write_bytes, commit_bytes, exists, read_json

FORMAT = "diffusion-pipeline/generation"
MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
LABEL_STEP = -2  # the noise-stream step whose draw picks sample i's label (never a sampler step)


class GenerateConfig(BaseModel):
    """The ``generate`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, description="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint / "
        "model directory URI. Default: models:/<registry model name>@champion.")
    num_samples: int = Field(500, ge=1, description="Samples in all.")
    sampler: str | None = Field(None, description="Default: the model's recorded sampler.")
    steps: int | None = Field(None, ge=1, description="Default: the model's recorded steps.")
    guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance (conditional models). Default: the "
        "model's recorded scale.")
    labels: str | int | list[float] = Field(
        "auto", description="auto (uniform over classes for conditional models, none "
        "otherwise), uniform, none (unconditional), a class id, or per-class weights.")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(256, ge=1, description="Images per sampler call.")
    shard_size: int = Field(4096, ge=1, description="Samples per output file.")
    output: str | None = Field(None, description="Default: ROOT/generations/<job id>.")
    format: Literal["parquet", "parquet+png"] = "parquet"
    num_actors: int | None = Field(
        None, ge=1, description="Sampler actors (model copies). Default: as many as the "
        "cluster's GPUs (or CPUs, for CPU actors) allow, at most one per shard.")
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor; a CPU actor runs "
                                  "torch on this many threads.")
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: on with GPUs.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if isinstance(v, str) and v not in ("auto", "uniform", "none"):
            raise ValueError("generate.labels must be auto, uniform, none, a class id or a list "
                             f"of per-class weights, got {v!r}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"generate.labels class id must be >= 0, got {v}")
        if isinstance(v, list) and (not v or any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("generate.labels weights must be non-negative with a positive sum")
        return v


# --------------------------------------------------------------------------------------------
# The job: model, settings, identity
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything that determines the output, resolved and checked before any work starts."""

    model_ref: str
    model_version: str | None  # registry version, when from models:/
    weights_sha256: str
    config: dict  # the model's {"unet", "diffusion", "class_names"}
    sampler: dict  # SamplerConfig fields
    guidance_scale: float | None  # None: no guidance (unconditional model or labels none)
    labels: Any  # None, an int, or a list of class weights
    seed: int
    num_samples: int
    shard_size: int
    format: str

    def identity(self) -> dict:
        d = asdict(self)
        del d["model_ref"]  # the same weights under another name are the same job
        return d

    @property
    def job_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()
                              ).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, int, int]:
        u = self.config["unet"]
        return (u["in_channels"], u["resolution"], u["resolution"])

    def shards(self) -> list[tuple[int, int, int]]:
        """(shard number, first index, end index) for every shard."""
        n, s = self.num_samples, self.shard_size
        return [(k, k * s, min(n, (k + 1) * s)) for k in range((n + s - 1) // s)]


def resolve_job(cfg: GenerateConfig, runtime: RuntimeConfig, *, default_model: str | None = None,
                echo=print) -> tuple[Job, Any]:
    """Load the model and check every setting against it; returns (job, model)."""
    from diffusion.samplers import SamplerConfig

    ref = cfg.model or default_model
    if not ref:
        raise GenerateError("generate.model is not set; give models:/<name>@champion, "
                            "models:/<name>/<version> or a checkpoint URI")
    loaded = load_model_ref(ref, runtime)
    model, config, defaults = loaded.model, loaded.config, loaded.defaults
    unet, T = config["unet"], config["diffusion"]["T"]
    conditional = unet.get("num_classes") is not None
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
    if labels is None:
        if cfg.guidance_scale is not None and cfg.guidance_scale != 1.0:
            raise GenerateError(
                f"generate.guidance_scale={cfg.guidance_scale} needs class labels and a "
                f"conditional model ({ref} is {'conditional' if conditional else 'not'}; labels "
                "are none); drop generate.guidance_scale or set generate.labels")
        scale = None
    else:
        scale = cfg.guidance_scale if cfg.guidance_scale is not None else \
            float((defaults or {}).get("guidance_scale", 1.0))
    job = Job(model_ref=ref, model_version=loaded.version, weights_sha256=loaded.weights_sha256,
              config={k: config[k] for k in ("unet", "diffusion", "class_names") if k in config},
              sampler=asdict(sampler), guidance_scale=scale, labels=labels, seed=cfg.seed,
              num_samples=cfg.num_samples, shard_size=cfg.shard_size, format=cfg.format)
    return job, model


def labels_for(job: Job, indices: np.ndarray) -> np.ndarray | None:
    """Sample i's label: fixed, or drawn from the class weights by the (seed, i) stream."""
    if job.labels is None:
        return None
    if isinstance(job.labels, int):
        return np.full(len(indices), job.labels, np.int64)
    from diffusion.noise import stream_seed

    cdf = np.cumsum(np.asarray(job.labels, np.float64))
    cdf /= cdf[-1]
    u = np.array([stream_seed(job.seed, int(i), LABEL_STEP) / 2.0 ** 63 for i in indices])
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Worker side: one actor per model copy
# --------------------------------------------------------------------------------------------


def sample_indices(model, job: Job, indices: np.ndarray, batch_size: int, device,
                   autocast_dtype=None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [len(indices), C, H, W] samples and their labels (None: unconditional)."""
    from diffusion import SampleNoise, SamplerConfig
    from diffusion.pipeline import DiffusionConfig, sample_images

    diffusion = DiffusionConfig.from_dict(job.config["diffusion"])
    labels = labels_for(job, indices)
    images = sample_images(
        model, diffusion.build_schedule(), job.shape,
        SampleNoise(job.seed, indices.tolist(), device=device), SamplerConfig(**job.sampler),
        prediction=diffusion.prediction, labels=labels,
        guidance_scale=1.0 if job.guidance_scale is None else job.guidance_scale,
        null_label=job.config["unet"].get("num_classes"), batch_size=batch_size,
        autocast_dtype=autocast_dtype)
    return images.numpy(), labels


def shard_bytes(job: Job, start: int, images: np.ndarray, labels: np.ndarray | None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(images)
    width = int(np.prod(job.shape))
    table = pa.table({
        "index": pa.array(np.arange(start, start + n), pa.int64()),
        "label": pa.array(np.full(n, -1, np.int32) if labels is None else labels.astype(np.int32)),
        "pixels": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(images).tobytes())]),
    }).replace_schema_metadata({"diffusion-pipeline.job": job.job_id})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Sampler:
    """A Ray Data actor: loads the model once; each call turns shard descriptions into written
    shards and returns one row of statistics per shard.

    All of its torch work runs on one thread of its own. Ray Data builds the actor on the
    process's main thread but runs each call on another thread, and every thread that runs torch
    CPU ops gets its own OpenMP (libgomp) team: loading the model on the main thread and sampling
    on the call thread leaves two teams, more OpenMP threads than the CPUs reserved, and libgomp
    then all but stops spinning between parallel regions (its throttled spin count), so the
    workers sleep and wake around each of sampling's many small ops: with 2 threads on 2 cores
    the actor used ~1.5 cores, about 20% slower than the same loop in a plain process."""

    def __init__(self, job: dict, weights_ref, output: str, options: dict, batch_size: int,
                 bf16: str, cpus: float = 1.0):
        from concurrent.futures import ThreadPoolExecutor

        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._torch_thread.submit(self._setup, job, weights_ref, output, options, batch_size,
                                  bf16, cpus).result()

    def _setup(self, job: dict, weights_ref, output: str, options: dict, batch_size: int,
               bf16: str, cpus: float) -> None:
        import ray
        import safetensors.torch
        import torch

        from diffusion.serialization import unet_from_state

        self.job = Job(**job)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # as many threads as the CPUs Ray reserved for us
            torch.set_num_threads(max(1, int(cpus)))
        weights = ray.get(weights_ref[0]) if isinstance(weights_ref, list) else weights_ref
        model = unet_from_state(self.job.config, safetensors.torch.load(weights))
        self.model = model.to(self.device)
        on_gpu = self.device.type == "cuda"
        self.autocast = torch.bfloat16 if bf16 == "on" or (bf16 == "auto" and on_gpu) else None
        self.out = Location.of(output, options)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        return self._torch_thread.submit(self._shards, batch).result()

    def _shards(self, batch: dict) -> dict:
        rows: dict[str, list] = {"shard": [], "rows": [], "seconds": [], "path": []}
        for k, start, end in zip(batch["shard"], batch["start"], batch["end"], strict=True):
            t0 = time.perf_counter()
            indices = np.arange(int(start), int(end))
            images, labels = sample_indices(self.model, self.job, indices, self.batch_size,
                                            self.device, self.autocast)
            if self.job.format == "parquet+png":
                for i, img in zip(indices, images, strict=True):
                    atomic_write_bytes(self.out.child("png", f"{i:09d}.png"), png_bytes(img))
            rel = f"shards/shard-{int(k):06d}.parquet"
            atomic_write_bytes(self.out.child(rel), shard_bytes(self.job, int(start), images,
                                                                labels))
            rows["shard"].append(int(k))
            rows["rows"].append(len(indices))
            rows["seconds"].append(time.perf_counter() - t0)
            rows["path"].append(rel)
        return {k: np.asarray(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def auto_actors(cfg: GenerateConfig, shards: int) -> int:
    """As many actors as the cluster's GPUs (GPU actors) or CPUs (CPU actors) hold, at most one
    per shard to write; at least one."""
    import ray

    res = ray.cluster_resources()
    fit = res.get("GPU", 0) / cfg.gpus_per_actor if cfg.gpus_per_actor else \
        res.get("CPU", 1) / cfg.cpus_per_actor
    return max(1, min(shards, int(fit)))


def _complete_shards(out: Location, job: Job) -> set[int]:
    """Shards already on storage with the right row count and job (atomic writes: a file that
    exists is whole; the checks catch a file from something else)."""
    import pyarrow.parquet as pq

    from tasks.storage import call

    shards_dir = out.child("shards")
    try:  # one listing, not one request per shard (a 2M-sample job has hundreds)
        present = {p.rstrip("/").rsplit("/", 1)[-1]
                   for p in call(shards_dir, shards_dir.fs.ls, shards_dir.path, detail=False)}
    except FileNotFoundError:
        present = set()
    done: set[int] = set()
    for k, start, end in job.shards():
        name = f"shard-{k:06d}.parquet"
        if name not in present:
            continue
        loc = shards_dir.child(name)
        try:
            with loc.fs.open(loc.path, "rb") as f:
                meta = pq.read_metadata(f)
            tag = (meta.metadata or {}).get(b"diffusion-pipeline.job", b"").decode()
            if meta.num_rows == end - start and tag == job.job_id:
                done.add(k)
        except OSError:
            pass
    return done


def _job_record(job: Job) -> dict:
    return {"format": FORMAT, "job_id": job.job_id, "model_ref": job.model_ref,
            **job.identity()}


@dataclass
class GenerateResult:
    manifest: dict
    output: str
    reused: bool
    seconds: float
    shards_written: int

    def summary(self) -> dict:
        m = self.manifest
        return {"job_id": m["job_id"], "output": self.output, "num_samples": m["num_samples"],
                "shards": len(m["shards"]), "shards_written": self.shards_written,
                "reused": self.reused, "seconds": round(self.seconds, 1),
                "model_ref": m["model_ref"], "model_version": m["model_version"],
                "sampler": m["sampler"], "images_per_s": m.get("images_per_s"),
                "manifest_uri": f"{self.output.rstrip('/')}/{MANIFEST}"}


def generate(cfg: GenerateConfig, runtime: RuntimeConfig, *, default_model: str | None = None,
             echo=print) -> GenerateResult:
    """Run (or finish, or find complete) the generation job ``cfg`` describes."""
    import safetensors.torch

    from tasks.storage import storage_options

    t0 = time.perf_counter()
    job, model = resolve_job(cfg, runtime, default_model=default_model, echo=echo)
    root = runtime.root_location()
    out = Location.of(cfg.output, storage_options(cfg.output, runtime)) if cfg.output else \
        root.child("generations", job.job_id)
    record = _job_record(job)
    manifest_loc, job_loc = out.child(MANIFEST), out.child(JOB_FILE)
    for loc in (manifest_loc, job_loc):
        if exists(loc):
            found = read_json(loc)
            if found.get("job_id") != job.job_id:
                raise GenerateError(
                    f"{out.describe()} already holds generation job {found.get('job_id')} "
                    f"({found.get('model_ref')}, {found.get('num_samples')} samples, seed "
                    f"{found.get('seed')}), not this one ({job.job_id}); choose another "
                    "generate.output or remove it")
    if exists(manifest_loc):
        m = read_json(manifest_loc)
        echo(f"generation job {job.job_id} is complete at {out.describe()}: "
             f"{m['num_samples']} samples; nothing to do")
        return GenerateResult(m, out.describe(), True, time.perf_counter() - t0, 0)
    commit_bytes(job_loc, json.dumps(record, indent=2).encode())

    shards = job.shards()
    done = _complete_shards(out, job)
    todo = [s for s in shards if s[0] not in done]
    total = job.num_samples
    have = sum(e - s for k, s, e in shards if k in done)
    sampler_txt = f"{job.sampler['name']}:{job.sampler['steps']}"
    echo(f"generation job {job.job_id}: {total} samples of {job.model_ref}"
         + (f" (v{job.model_version})" if job.model_version else "")
         + f" with {sampler_txt}, seed {job.seed} → {out.describe()}"
         + (f"; {len(done)} of {len(shards)} shards already written, resuming" if done else ""))

    stats: dict[int, dict] = {}
    if todo:
        import ray

        ensure_ray(runtime, echo=echo)
        weights = safetensors.torch.save(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        weights_ref = ray.put(weights)
        ds = ray.data.from_items([{"shard": k, "start": s, "end": e} for k, s, e in todo],
                                 override_num_blocks=len(todo))
        actors = cfg.num_actors or auto_actors(cfg, len(todo))
        echo(f"  {len(todo)} shard(s) on {actors} sampler actor(s) ({cfg.cpus_per_actor:g} CPU"
             + (f", {cfg.gpus_per_actor:g} GPU" if cfg.gpus_per_actor else "") + " each)")
        ds = ds.map_batches(
            Sampler, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs={
                "job": asdict(job), "weights_ref": [weights_ref], "output": out.url,
                "options": storage_options(out.url, runtime), "batch_size": cfg.batch_size,
                "bf16": cfg.bf16, "cpus": cfg.cpus_per_actor})
        t_run = time.perf_counter()
        last = 0.0
        # iter_batches without prefetching hands over each shard's row as its actor call ends
        # (iter_rows delivers it one shard late, so progress would lag by a shard)
        for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
            for k, rows in zip(batch["shard"], batch["rows"], strict=True):
                stats[int(k)] = {"rows": int(rows)}
                have += int(rows)
                maybe_die(f"generate-after-{len(stats)}-shards")
            now = time.perf_counter()
            if now - last > 5 or have == total:
                rate = sum(v["rows"] for v in stats.values()) / max(now - t_run, 1e-9)
                echo(f"  {have}/{total} samples ({have / total:.0%}), {rate:.1f} images/s")
                last = now
        missing = [k for k, _, _ in todo if k not in stats]
        if missing:
            raise RuntimeError(f"generation job {job.job_id}: shards {missing} were not written")
    elapsed = time.perf_counter() - t0
    written = sum(v["rows"] for v in stats.values())
    manifest = record | {
        "shape": list(job.shape),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": [{"path": f"shards/shard-{k:06d}.parquet", "first": s, "rows": e - s}
                   for k, s, e in shards],
        "images_per_s": round(written / elapsed, 2) if written else None,
        "class_names": job.config.get("class_names"),
    }
    if not commit_bytes(manifest_loc, json.dumps(manifest, indent=2).encode()):
        manifest = read_json(manifest_loc)  # a concurrent run of the same job committed first
    echo(f"generation job {job.job_id} complete: {total} samples in {len(shards)} shard(s) "
         f"({len(todo)} written now) at {out.describe()}")
    return GenerateResult(manifest, out.describe(), False, elapsed, len(todo))


def read_samples(output: str, runtime: RuntimeConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """All samples of a complete job in index order: (uint8 [N, C, H, W], labels, manifest)."""
    from tasks.storage import storage_options

    out = Location.of(output, storage_options(output, runtime))
    manifest = read_json(out.child(MANIFEST))
    x, y = read_pixel_files(out.fs, [out.child(s["path"]).path for s in manifest["shards"]],
                            manifest["shape"])
    return x, y, manifest


GRID_FILE = "grid.png"


def grid_images(x: np.ndarray, y: np.ndarray, num_classes: int, per_class: int = 10,
                max_images: int = 100) -> tuple[np.ndarray, int]:
    """The images of a sample grid and its row length: for labelled samples one row per class
    (its first ``per_class`` samples in index order), else the first ``max_images``."""
    if num_classes and (y >= 0).any():
        rows = [x[np.flatnonzero(y == c)[:per_class]] for c in range(num_classes)]
        rows = [np.concatenate([r, np.zeros((per_class - len(r), *x.shape[1:]), np.uint8)])
                for r in rows if len(r)]  # a class with too few samples is padded with black
        return np.concatenate(rows), per_class
    return x[:max_images], per_class


def write_grid(output: str, runtime: RuntimeConfig, *, per_class: int = 10) -> tuple[str, bytes]:
    """Draw ``grid.png`` beside a complete job's shards from its first shard (at most
    ``shard_size`` samples are read, whatever the job's size); returns its URI and the PNG.
    Derived from the committed samples: a rerun redraws it byte for byte the same."""
    from tasks.images import grid_png
    from tasks.storage import atomic_write_bytes, storage_options

    out = Location.of(output, storage_options(output, runtime))
    manifest = read_json(out.child(MANIFEST))
    x, y = read_pixel_files(out.fs, [out.child(manifest["shards"][0]["path"]).path],
                            manifest["shape"])
    images, nrow = grid_images(x, y, len(manifest.get("class_names") or []), per_class)
    scale = max(1, 48 // manifest["shape"][-1])  # small images drawn at least 48 px wide
    loc = out.child(GRID_FILE)
    png = grid_png(images, nrow=nrow, scale=scale)
    atomic_write_bytes(loc, png)
    return loc.describe(), png

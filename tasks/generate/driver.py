"""Driver side: run a generation job as a Ray Data job, resume it, commit its manifest.

Ray Data runs ``from_items(missing shards) → map_batches(Sampler actors)``
(:class:`tasks.generate.worker.Sampler`). A job killed part-way and started again writes only
the missing shards (a shard file that exists is complete: the actors write atomically); a
complete job returns its manifest without starting Ray. The manifest is committed last, once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from tasks.errors import GenerateError
from tasks.faults import maybe_die
from tasks.generate.config import GenerateConfig
from tasks.generate.job import Job
from tasks.generate.layout import FORMAT, JOB_FILE, MANIFEST, SHARDS_DIR, shard_name, shard_path
from tasks.generate.resolve import resolve_job
from tasks.generate.worker import Sampler
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import Location, call, commit_bytes, exists, read_json, storage_options


@dataclass
class GenerateResult:
    """What ``generate`` returns: the committed manifest, the output's URI, whether a complete
    job was found (nothing run), the seconds taken and the shards written by this call."""

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
    t0 = time.perf_counter()
    job, model = resolve_job(cfg, runtime, default_model=default_model, echo=echo)
    out = _output(cfg, runtime, job)
    record = _job_record(job)
    manifest_loc = out.child(MANIFEST)
    _refuse_another_job(out, job)
    if exists(manifest_loc):
        m = read_json(manifest_loc)
        _same_job(out, job, m)  # another job may have committed since the check above
        echo(f"generation job {job.job_id} is complete at {out.describe()}: "
             f"{m['num_samples']} samples; nothing to do")
        return GenerateResult(m, out.describe(), True, time.perf_counter() - t0, 0)
    _claim(out, job, record)

    shards = job.shards()
    done = _complete_shards(out, job)
    todo = [s for s in shards if s[0] not in done]
    have = sum(e - s for k, s, e in shards if k in done)
    echo(f"generation job {job.job_id}: {job.num_samples} samples of {job.model_ref}"
         + (f" (v{job.model_version})" if job.model_version else "")
         + f" with {job.sampler['name']}:{job.sampler['steps']}, seed {job.seed}"
         + f" → {out.describe()}"
         + (f"; {len(done)} of {len(shards)} shards already written, resuming" if done else ""))
    stats = _write_shards(cfg, runtime, job, model, out, todo, have, echo) if todo else {}
    elapsed = time.perf_counter() - t0
    manifest = _commit_manifest(out, record, job, stats, elapsed)
    echo(f"generation job {job.job_id} complete: {job.num_samples} samples in {len(shards)} "
         f"shard(s) ({len(todo)} written now) at {out.describe()}")
    return GenerateResult(manifest, out.describe(), False, elapsed, len(todo))


def _output(cfg: GenerateConfig, runtime: RuntimeConfig, job: Job) -> Location:
    """generate.output, else ROOT/generations/<job id>."""
    root = runtime.root_location()
    return Location.of(cfg.output, storage_options(cfg.output, runtime)) if cfg.output else \
        root.child("generations", job.job_id)


def _job_record(job: Job) -> dict:
    """What ``_job.json`` holds; the manifest adds to it."""
    return {"format": FORMAT, "job_id": job.job_id, "model_ref": job.model_ref,
            **job.identity()}


def _refuse_another_job(out: Location, job: Job) -> None:
    """An output that holds another job's manifest or job file is not written over (checked
    early, before any work; :func:`_claim` is what decides a race)."""
    for loc in (out.child(MANIFEST), out.child(JOB_FILE)):
        if exists(loc):
            _same_job(out, job, read_json(loc))


def _same_job(out: Location, job: Job, found: dict) -> None:
    if found.get("job_id") != job.job_id:
        raise GenerateError(
            f"{out.describe()} already holds generation job {found.get('job_id')} "
            f"({found.get('model_ref')}, {found.get('num_samples')} samples, seed "
            f"{found.get('seed')}), not this one ({job.job_id}){_differences(job, found)}; "
            "choose another generate.output or remove it")


def _differences(job: Job, found: dict) -> str:
    """``: it differs in bf16 (False there, True here), ...``: the fields of the job's identity
    the found record holds otherwise (structures by name only), or nothing."""
    diff = []
    for key, here in job.identity().items():
        there = found.get(key, "unrecorded")
        if there != here:
            diff.append(key if isinstance(here, dict | list) else f"{key} ({there} there, "
                        f"{here} here)")
    return f": it differs in {', '.join(diff)}" if diff else ""


def _claim(out: Location, job: Job, record: dict) -> None:
    """Claim ``out`` for this job with a create-only ``_job.json`` before any shard is written.
    The same job's record is the same bytes, so its reruns and concurrent drivers share the
    claim; a different job that claimed first wins and this one fails, naming it."""
    loc = out.child(JOB_FILE)
    if not commit_bytes(loc, json.dumps(record, indent=2).encode()):
        _same_job(out, job, read_json(loc))


def _complete_shards(out: Location, job: Job) -> set[int]:
    """Shards already on storage with the right row count and job (atomic writes: a file that
    exists is whole; the checks catch a file from something else)."""
    import pyarrow.parquet as pq

    shards_dir = out.child(SHARDS_DIR)
    try:  # one listing, not one request per shard (a 2M-sample job has hundreds)
        present = {p.rstrip("/").rsplit("/", 1)[-1]
                   for p in call(shards_dir, shards_dir.fs.ls, shards_dir.path, detail=False)}
    except FileNotFoundError:
        present = set()
    done: set[int] = set()
    for k, start, end in job.shards():
        name = shard_name(k)
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


def auto_actors(cfg: GenerateConfig, shards: int) -> int:
    """As many actors as the cluster's GPUs (GPU actors) or CPUs (CPU actors) hold, at most one
    per shard to write; at least one."""
    import ray

    res = ray.cluster_resources()
    fit = res.get("GPU", 0) / cfg.gpus_per_actor if cfg.gpus_per_actor else \
        res.get("CPU", 1) / cfg.cpus_per_actor
    return max(1, min(shards, int(fit)))


def _write_shards(cfg: GenerateConfig, runtime: RuntimeConfig, job: Job, model, out: Location,
                  todo: list[tuple[int, int, int]], have: int, echo) -> dict[int, dict]:
    """Write the shards ``todo`` on a pool of Sampler actors, reporting progress from ``have``
    samples already written; returns {shard: {"rows": n}} for each."""
    import ray
    import safetensors.torch

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
            "cpus": cfg.cpus_per_actor})
    stats = _follow(ds, job.num_samples, have, echo)
    missing = [k for k, _, _ in todo if k not in stats]
    if missing:
        raise RuntimeError(f"generation job {job.job_id}: shards {missing} were not written")
    return stats


def _follow(ds, total: int, have: int, echo) -> dict[int, dict]:
    """Run ``ds`` to its end, collecting each shard's row and echoing progress (at most every
    5 s, and at the end)."""
    stats: dict[int, dict] = {}
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
    return stats


def _commit_manifest(out: Location, record: dict, job: Job, stats: dict[int, dict],
                     elapsed: float) -> dict:
    """Commit the manifest, last; returns it (or the one a concurrent run of the same job
    committed first)."""
    written = sum(v["rows"] for v in stats.values())
    manifest = record | {
        "shape": list(job.shape),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": [{"path": shard_path(k), "first": s, "rows": e - s}
                   for k, s, e in job.shards()],
        "images_per_s": round(written / elapsed, 2) if written else None,
        "class_names": job.config.get("class_names"),
    }
    manifest_loc = out.child(MANIFEST)
    if not commit_bytes(manifest_loc, json.dumps(manifest, indent=2).encode()):
        manifest = read_json(manifest_loc)  # a concurrent run of the same job committed first
        _same_job(out, job, manifest)
    return manifest

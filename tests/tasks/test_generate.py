"""Batch generation on Ray Data with tiny models: determinism, resume, reuse, bad input, S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from diffusion import UNet, UNetConfig
from diffusion.serialization import save_model
from tasks.errors import GenerateError
from tasks.generate import (
    GenerateConfig,
    generate,
    labels_for,
    read_samples,
    resolve_job,
    sample_indices,
)
from tasks.runtime import RuntimeConfig

REPO = Path(__file__).resolve().parents[2]
DIFF = {"schedule": "linear", "T": 50, "beta_start": 1e-4, "beta_end": 0.02, "prediction": "eps",
        "min_snr_gamma": None}


def tiny(path: Path, num_classes: int | None) -> str:
    cfg = UNetConfig(resolution=8, in_channels=1, base_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(), num_classes=num_classes)
    torch.manual_seed(0)
    save_model(path / "model", UNet(cfg).state_dict(),
               {"unet": cfg.to_dict(), "diffusion": DIFF,
                "class_names": [f"c{i}" for i in range(num_classes or 0)]})
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen-models")
    return {"cond": tiny(base / "cond", 3), "uncond": tiny(base / "uncond", None)}


def job(models, tmp_path, **kw) -> GenerateConfig:
    settings = {"model": models["cond"], "num_samples": 30, "sampler": "ddim", "steps": 5,
                "shard_size": 8, "batch_size": 4, "guidance_scale": 2.0} | kw
    return GenerateConfig(**settings)


def rt(tmp_path) -> RuntimeConfig:
    return RuntimeConfig(root=str(tmp_path / "root"))


def test_output_is_what_in_process_sampling_gives_whatever_the_batching(ray_local, models,
                                                                        tmp_path):
    cfg = job(models, tmp_path, num_actors=2)
    res = generate(cfg, rt(tmp_path), echo=lambda s: None)
    m = res.manifest
    assert not res.reused and res.shards_written == 4 and m["num_samples"] == 30
    assert [s["rows"] for s in m["shards"]] == [8, 8, 8, 6] and m["shape"] == [1, 8, 8]
    assert res.output == str(tmp_path / "root" / "generations" / m["job_id"])
    x, y, _ = read_samples(res.output, rt(tmp_path))
    assert x.shape == (30, 1, 8, 8) and x.dtype == np.uint8 and set(y) <= {0, 1, 2}

    # in-process, one batch of 30: the same images and labels
    j, model = resolve_job(cfg, rt(tmp_path), echo=lambda s: None)
    ref_x, ref_y = sample_indices(model, j, np.arange(30), 30, torch.device("cpu"))
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)

    # another batch size, one actor, another output: identical
    other = generate(cfg.model_copy(update={"batch_size": 7, "num_actors": 1,
                                            "output": str(tmp_path / "other")}),
                     rt(tmp_path), echo=lambda s: None)
    assert other.manifest["job_id"] == m["job_id"]
    assert np.array_equal(read_samples(other.output, rt(tmp_path))[0], x)

    # the same job again: nothing to do, Ray not needed
    again = generate(cfg, rt(tmp_path), echo=lambda s: None)
    assert again.reused and again.shards_written == 0 and again.manifest == m


def test_labels_follow_the_weights_and_a_fixed_label(models, tmp_path):
    j, _ = resolve_job(job(models, tmp_path, labels=[1.0, 0.0, 3.0], num_samples=4000),
                       rt(tmp_path), echo=lambda s: None)
    y = labels_for(j, np.arange(4000))
    assert 1 not in y and abs((y == 2).mean() - 0.75) < 0.03
    j, _ = resolve_job(job(models, tmp_path, labels=1), rt(tmp_path), echo=lambda s: None)
    assert set(labels_for(j, np.arange(10))) == {1}


def test_the_job_id_covers_the_precision_used_and_the_device(models, tmp_path, monkeypatch):
    """bf16 and the device change the pixels, so the job holds them as used: bf16 resolved
    (``auto``: on for GPU actors only), the device kind ``cpu`` (every CPU is one kind) or
    ``cuda:<GPU model>`` (models differ in kernels). (Before, neither was in the job: a rerun
    with only bf16 changed was the same job.)"""
    import tasks.generate.resolve as resolve

    def resolved(**kw):
        return resolve_job(job(models, tmp_path, **kw), rt(tmp_path), echo=lambda s: None)[0]

    auto, off, on = (resolved(bf16=b) for b in ("auto", "off", "on"))
    assert (auto.identity()["bf16"], auto.identity()["device"]) == (False, "cpu")
    assert on.identity()["bf16"] is True
    assert auto.job_id == off.job_id != on.job_id

    gpu = {}
    for model in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"):
        monkeypatch.setattr(resolve, "gpu_kind", lambda cfg, runtime, echo, m=model: f"cuda:{m}")
        gpu[model] = resolved(gpus_per_actor=1.0)
    h100 = gpu["NVIDIA H100 80GB HBM3"]
    assert (h100.bf16, h100.device) == (True, "cuda:NVIDIA H100 80GB HBM3")
    assert len({on.job_id, h100.job_id, gpu["NVIDIA A100-SXM4-80GB"].job_id}) == 3
    assert resolved(gpus_per_actor=1.0, bf16="off").job_id != h100.job_id


def test_a_rerun_with_only_bf16_changed_is_not_given_the_other_precisions_output(models,
                                                                                 tmp_path):
    """An output holding a complete fp32 job (its claim and manifest as the driver writes
    them): the same settings find it complete; the same settings with bf16 on are refused in
    one line naming the difference. (Before, they were given the fp32 output as complete.)"""
    import json

    from tasks.generate import driver

    out = tmp_path / "out"
    out.mkdir()
    fp32, _ = resolve_job(job(models, tmp_path, output=str(out)), rt(tmp_path),
                          echo=lambda s: None)
    record = driver._job_record(fp32)
    (out / "_job.json").write_text(json.dumps(record))
    (out / "_manifest.json").write_text(json.dumps(record | {"shards": []}))
    assert generate(job(models, tmp_path, output=str(out)), rt(tmp_path),
                    echo=lambda s: None).reused
    with pytest.raises(GenerateError) as failed:
        generate(job(models, tmp_path, output=str(out), bf16="on"), rt(tmp_path),
                 echo=lambda s: None)
    failed.match(r"already holds generation job \w{16} .*not this one \(\w{16}\): it differs "
                 r"in bf16 \(False there, True here\); choose another generate.output or remove")
    assert "\n" not in str(failed.value)


def test_a_sampler_actor_samples_with_the_jobs_numerics_or_refuses(models, tmp_path):
    """The actor takes its device and precision from the job, not from what it finds: a job
    that samples on another device is refused before any shard is written."""
    from dataclasses import asdict, replace

    import safetensors.torch

    from tasks.generate import Sampler

    j, model = resolve_job(job(models, tmp_path, bf16="on"), rt(tmp_path), echo=lambda s: None)
    weights = safetensors.torch.save(model.state_dict())
    actor = Sampler(asdict(j), weights, str(tmp_path / "o"), {}, 4)
    assert actor.device.type == "cpu" and actor.job.bf16 is True
    with pytest.raises(GenerateError, match=r"samples on cuda:Some GPU 9000, but this sampler "
                                            r"actor has (cpu|cuda:.+);"):
        Sampler(asdict(replace(j, device="cuda:Some GPU 9000")), weights, str(tmp_path / "o"),
                {}, 4)
    assert not (tmp_path / "o").exists()


def test_a_different_job_in_the_output_is_refused(ray_local, models, tmp_path):
    out = str(tmp_path / "out")
    generate(job(models, tmp_path, num_samples=5, output=out), rt(tmp_path), echo=lambda s: None)
    with pytest.raises(GenerateError, match=r"already holds generation job .*choose another"):
        generate(job(models, tmp_path, num_samples=5, seed=1, output=out), rt(tmp_path),
                 echo=lambda s: None)


@pytest.mark.parametrize("b_gets", ["its claim in", "all done"])
def test_two_jobs_racing_into_one_output_never_mix(ray_local, models, tmp_path, monkeypatch,
                                                   b_gets):
    """Job B gets into the output between job A's early check and A's claim (the check alone
    was check-then-act): A fails naming B before writing anything, and the output holds only
    B's claim, shards and manifest. (Before, A wrote its shards beside B's claim, or returned
    B's manifest as its own.)"""
    import json

    import tasks.generate.driver as driver

    out = tmp_path / "out"
    check = driver._refuse_another_job

    def check_then_b(loc, j):
        check(loc, j)
        if b_gets == "its claim in":
            out.mkdir()
            (out / "_job.json").write_text(json.dumps({"job_id": "b" * 16, "seed": 1}))
        else:
            monkeypatch.setattr(driver, "_refuse_another_job", check)
            generate(job(models, tmp_path, num_samples=5, seed=1, output=str(out)),
                     rt(tmp_path), echo=lambda s: None)

    monkeypatch.setattr(driver, "_refuse_another_job", check_then_b)
    with pytest.raises(GenerateError, match=r"already holds generation job \w{16} .*not this "
                                            r"one"):
        generate(job(models, tmp_path, num_samples=5, output=str(out)), rt(tmp_path),
                 echo=lambda s: None)
    b = json.loads((out / "_job.json").read_text())["job_id"]
    if b_gets == "its claim in":
        assert not (out / "shards").exists() and not (out / "_manifest.json").exists()
    else:
        assert json.loads((out / "_manifest.json").read_text())["job_id"] == b
        for shard in (out / "shards").iterdir():
            import pyarrow.parquet as pq

            assert pq.read_metadata(shard).metadata[b"diffusion-pipeline.job"].decode() == b


@pytest.mark.parametrize(("kw", "message"), [
    ({"sampler": "nosuch"}, "generate.sampler/steps nosuch:5"),
    ({"steps": 51}, "between 1 and T=50"),
    ({"model": "uncond", "labels": "uniform"}, "is unconditional"),
    ({"model": "uncond", "labels": 1}, "is unconditional"),
    ({"model": "uncond", "labels": "auto", "guidance_scale": 3.0}, "needs class labels"),
    ({"labels": 3}, "has classes 0..2"),
    ({"labels": [1.0, 1.0]}, "has 2 weights but"),
])
def test_bad_settings_fail_before_any_work(models, tmp_path, kw, message):
    if kw.get("model") == "uncond":
        kw = kw | {"model": models["uncond"]}
    with pytest.raises(GenerateError, match=message):
        generate(job(models, tmp_path, **kw), rt(tmp_path), echo=lambda s: None)
    assert not (tmp_path / "root" / "generations").exists()


def test_config_errors():
    with pytest.raises(ValidationError, match="num_samples"):
        GenerateConfig(num_samples=0)
    with pytest.raises(ValidationError, match=r"generate\.labels must be"):
        GenerateConfig(labels="most")


def test_killed_job_resumes_and_writes_only_missing_shards(ray_local, models, tmp_path,
                                                         kill_session):
    out = tmp_path / "killed"
    cfg = job(models, tmp_path, num_samples=40, output=str(out))
    env = {**os.environ, "DIFFUSION_PIPELINE_FAULT": "generate-after-2-shards",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    code = ("from tasks.generate import GenerateConfig, generate;"
            "from tasks.runtime import RuntimeConfig;"
            f"generate(GenerateConfig.model_validate_json({cfg.model_dump_json()!r}),"
            f" RuntimeConfig(root={str(tmp_path / 'root')!r}, ray_num_cpus=1))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        kill_session(proc)  # and the local Ray it started, workers included
    assert proc.returncode == -9, output[-3000:]
    assert not (out / "_manifest.json").exists() and (out / "_job.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert 2 <= len(before) < 5

    res = generate(cfg, rt(tmp_path), echo=lambda s: None)
    assert res.shards_written == 5 - len(before)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert all(after[k] == v for k, v in before.items())  # finished shards were not rewritten
    x, _, m = read_samples(str(out), rt(tmp_path))
    assert len(x) == 40 and [s["rows"] for s in m["shards"]] == [8] * 5
    j, model = resolve_job(cfg, rt(tmp_path), echo=lambda s: None)
    ref_x, _ = sample_indices(model, j, np.arange(40), 40, torch.device("cpu"))
    assert np.array_equal(x, ref_x)  # identical to an uninterrupted run


def test_png_files_and_an_s3_output(ray_local, models, tmp_path, s3):
    bucket = s3.bucket()
    runtime = RuntimeConfig(root=str(tmp_path / "root"), s3_endpoint_url=s3.endpoint)
    cfg = job(models, tmp_path, num_samples=6, format="parquet+png",
              output=f"s3://{bucket}/gen")
    res = generate(cfg, runtime, echo=lambda s: None)
    assert res.output == f"s3://{bucket}/gen"
    assert s3.client.exists(f"{bucket}/gen/_manifest.json")
    pngs = sorted(s3.client.ls(f"{bucket}/gen/png"))
    assert [p.rsplit("/", 1)[-1] for p in pngs] == [f"{i:09d}.png" for i in range(6)]
    x, _, _ = read_samples(res.output, runtime)
    from io import BytesIO

    from PIL import Image

    img = np.asarray(Image.open(BytesIO(s3.client.cat(pngs[3]))))
    assert np.array_equal(img, x[3, 0])

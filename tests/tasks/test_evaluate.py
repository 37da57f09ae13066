"""The evaluation stage on the embedded digits: metrics, the frontier's default, the cache, the
comparability key, memorization, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion import EMA, UNet, UNetConfig
from diffusion.pipeline import DiffusionConfig
from diffusion.serialization import WeightsIntegrityError, save_model
from diffusion.training import OptimConfig, make_lr_scheduler, make_optimizer, train_step
from flows.config import load_config
from tasks.datasets import open_dataset
from tasks.errors import EvalError
from tasks.evaluate import EvalConfig, evaluate, nearest_rms
from tasks.models import load_model_ref
from tasks.pixels import read_split

UNET = UNetConfig(resolution=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(), num_classes=10)
DIFF = DiffusionConfig(T=100)
FAST = EvalConfig(num_samples=120, frontier=["ddim:5", "ddim:20", "dpmpp_2m:10"], nll_images=16,
                  reference_steps=150, batch_size=60)


def _save(model, path, class_names):
    return save_model(path / "model", model.state_dict(),
                      {"unet": UNET.to_dict(), "diffusion": DIFF.to_dict(),
                       "class_names": class_names})


@pytest.fixture(scope="module")
def models(digits_root, tmp_path_factory):
    """Two models in checkpoint layout (<dir>/model/...): one trained for 300 steps on the
    digits, one untrained."""
    cfg = load_config(root=str(digits_root))
    rt = cfg.runtime.root_location()
    _, manifest = open_dataset(rt, "digits")
    x, y = read_split(rt, manifest, "train", 10_000)
    x = torch.from_numpy(x).float() / 127.5 - 1
    y = torch.from_numpy(y)
    torch.manual_seed(0)
    model = UNet(UNET)
    optim = OptimConfig(steps=300, lr=2e-3, warmup_steps=20)
    opt, ema = make_optimizer(model, optim), EMA(model, decay=0.99)
    sched, g = make_lr_scheduler(opt, optim), torch.Generator().manual_seed(0)
    schedule = DIFF.build_schedule()
    for _ in range(optim.steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        train_step(model, opt, sched, x[idx], y[idx], schedule, optim, ema=ema, null_class=10,
                   generator=g)
    ema.copy_to(model)
    base = tmp_path_factory.mktemp("models")
    trained = _save(model.eval(), base / "trained", manifest["class_names"]).parent
    torch.manual_seed(1)
    untrained = _save(UNet(UNET).eval(), base / "untrained", manifest["class_names"]).parent
    return {"trained": str(trained), "untrained": str(untrained), "cfg": cfg}


def run(models, which, ecfg=FAST, **kw):
    cfg = models["cfg"]
    lines = []
    res = evaluate(models[which], cfg.data, ecfg, cfg.runtime, echo=lines.append, **kw)
    return res, lines


def test_metrics_frontier_default_and_floor(models):
    res, lines = run(models, "trained")
    m = res["metrics"]
    assert res["features"]["kind"] == "reference" and len(res["features"]["sha256"]) == 64
    assert {"fd", "fd_floor", "fd_best", "nll_bpd", "nll_bpd_se", "memorization",
            "memorization_floor"} <= set(m)
    assert 0 < m["fd_floor"] < m["fd"]  # real vs real is the floor
    assert 0 < m["nll_bpd"] < 8 and m["nll_bpd_se"] > 0  # 8 bits/dim = a uniform model
    assert [(f["sampler"], f["steps"]) for f in res["frontier"]] == [
        ("ddim", 5), ("ddim", 20), ("dpmpp_2m", 10)]
    assert all(f["images_per_s"] > 0 and f["nfe"] > 0 for f in res["frontier"])
    # the default is the cheapest setting within the tolerance of the best
    best = min(f["fd"] for f in res["frontier"])
    ok = [f for f in res["frontier"] if f["fd"] <= best * (1 + FAST.tolerance)]
    cheapest = min(ok, key=lambda f: f["nfe"])
    assert res["default_sampler"] == {"name": cheapest["sampler"], "steps": cheapest["steps"]}
    assert m["fd"] == cheapest["fd"] and m["fd_best"] == best
    assert any("reference network" in s for s in lines)
    json.dumps(res)  # JSON-safe
    # the figures comparable across sample sizes, with what real data scores (issue 26 item 7)
    assert {"kid", "kid_low", "kid_high", "kid_se", "kid_floor", "fd_inf", "fd_inf_floor",
            "precision", "recall", "precision_floor", "recall_floor", "class_accuracy",
            "class_accuracy_floor"} <= set(m)
    assert m["kid_low"] < m["kid"] < m["kid_high"] and m["kid_floor"] < m["kid"]
    assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "precision_floor",
                                        "recall_floor", "class_accuracy"))
    assert m["class_accuracy_floor"] > 0.5  # the reference net on real val images
    assert res["fidelity"]["precision_recall_rows"] == FAST.num_samples  # the floor's 120
    # the floor holds as many real images as there are samples here: FD at its size is fd
    assert res["dataset"]["floor_images"] == FAST.num_samples and m["fd_matched"] == m["fd"]
    # samples and floor dealt from the reference's labels: KID and FD∞ stratified by class,
    # or said why not (120 samples over 10 classes can leave a class under 3 rows)
    for key in ("kid_strata", "kid_floor_strata"):
        assert res["fidelity"][key] == "by class" or res["fidelity"][key].startswith("none (")
    assert f"KID {m['kid']:.3f} [" in "\n".join(lines)
    # every FD and the NLL carry their bootstrap interval (issue 15); an FD's is for the
    # population FD, around the bias-corrected value, not around the plain FD at N (issue 26)
    for d in (m, *res["frontier"]):
        assert d["fd_low"] <= d["fd_corrected"] <= d["fd_high"] and d["fd_low"] < d["fd_high"], d
    assert m["nll_bpd_low"] < m["nll_bpd"] < m["nll_bpd_high"]
    assert (f"FD {m['fd']:.3f} ({m['fd_corrected']:.3f} [{m['fd_low']:.3f}, "
            f"{m['fd_high']:.3f}])") in "\n".join(lines)
    # and what a paired comparison needs is stored beside the result, before it
    import safetensors.numpy

    paired = safetensors.numpy.load_file(
        res["stored_at"].removesuffix(".json") + ".paired.safetensors")
    assert paired["samples/ddim:5"].shape == (FAST.num_samples, 64)
    assert set(paired) == {"samples/ddim:5", "samples/ddim:20", "samples/dpmpp_2m:10",
                           "reference", "nll", "labels", "reference_labels"}
    assert paired["reference"].shape[0] == res["dataset"]["val_images"]
    assert paired["nll"].shape == (FAST.nll_images,)
    assert abs(float(paired["nll"].mean()) - m["nll_bpd"]) < 1e-5


def test_trained_model_beats_an_untrained_one_on_the_same_key(models):
    good, _ = run(models, "trained")
    bad, _ = run(models, "untrained")
    assert good["eval_key"] == bad["eval_key"]  # same set, seeds and feature network
    assert good["metrics"]["fd"] < bad["metrics"]["fd"]
    assert good["metrics"]["nll_bpd"] < bad["metrics"]["nll_bpd"]


def test_second_evaluation_is_read_from_the_cache(models):
    first, _ = run(models, "trained")
    again, lines = run(models, "trained")
    assert any("reusing it" in s for s in lines)
    assert again["metrics"] == first["metrics"]
    other_seed, _ = run(models, "trained", FAST.model_copy(update={"seed": 7}))
    assert other_seed["eval_key"] != first["eval_key"]


def test_samples_do_not_depend_on_the_batch_size(models):
    a, _ = run(models, "trained", FAST.model_copy(update={"batch_size": 120}), use_cache=False)
    b, _ = run(models, "trained", FAST.model_copy(update={"batch_size": 7}), use_cache=False)
    assert a["eval_key"] == b["eval_key"]
    assert [f["fd"] for f in a["frontier"]] == pytest.approx([f["fd"] for f in b["frontier"]],
                                                             rel=1e-6)


def test_results_stored_before_the_size_free_figures_still_read():
    """A result stored before KID, FD∞, precision/recall and class accuracy (no such keys)
    still makes its summary line and table; one with them shows them, n/a where None."""
    from tasks.evaluate import table
    from tasks.evaluate.result import summary

    old = {"eval_key": "k", "dataset": {"name": "digits", "version": "v", "val_images": 324},
           "features": {"kind": "reference"}, "config": {"num_samples": 1000},
           "default_sampler": {"name": "ddim", "steps": 10},
           "frontier": [{"sampler": "ddim", "steps": 10, "nfe": 10, "fd": 1.0,
                         "images_per_s": 5.0}],
           "metrics": {"fd": 1.0, "fd_floor": 0.5, "fd_best": 1.0, "memorization": 0.0,
                       "memorization_floor": 0.0}}
    assert "KID" not in summary(old, "there") and "KID" not in table(old)
    new = old | {"metrics": old["metrics"] | {
        "kid": 0.25, "kid_low": 0.1, "kid_high": 0.4, "kid_floor": 0.01, "fd_inf": 0.8,
        "fd_inf_floor": None, "precision": 0.9, "recall": 0.7, "precision_floor": 0.95,
        "recall_floor": 0.93, "class_accuracy": 0.85, "class_accuracy_floor": 0.97}}
    line = summary(new, "there")
    assert "KID 0.250 [0.100, 0.400] (floor 0.010), FD∞ 0.800 (floor n/a)" in line
    assert "class accuracy 85.0% (floor 97.0%)" in line
    assert "| KID (unbiased, any sample size) | 0.250 [0.100, 0.400] | 0.010 |" in table(new)


def test_memorization_counts_copies_of_training_images():
    train = np.random.default_rng(0).integers(0, 256, (50, 1, 8, 8), dtype=np.uint8)
    copies = train[:10].copy()
    copies[:, :, 0, 0] ^= 1  # one grey level off: still a copy
    fresh = np.random.default_rng(1).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    d = nearest_rms(np.concatenate([copies, fresh]), train, torch.device("cpu"), chunk=16)
    assert (d[:10] < 0.01).all() and (d[10:] > 0.1).all()


def test_tampered_weights_are_refused_before_use(models, tmp_path):
    import shutil

    dst = tmp_path / "tampered"
    shutil.copytree(models["trained"], dst)
    w = dst / "model" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="SHA-256 mismatch"):
        load_model_ref(str(dst), models["cfg"].runtime)


def test_bad_inputs_are_clear_errors(models, tmp_path):
    cfg = models["cfg"]
    with pytest.raises(EvalError, match="neither a model directory"):
        evaluate(str(tmp_path), cfg.data, FAST, cfg.runtime, echo=lambda s: None)
    wrong = UNetConfig(resolution=16, in_channels=1, base_channels=8, channel_mult=(1,),
                       num_res_blocks=1, attention_resolutions=(), num_classes=10)
    save_model(tmp_path / "m16" / "model", UNet(wrong).state_dict(),
               {"unet": wrong.to_dict(), "diffusion": DIFF.to_dict()})
    with pytest.raises(EvalError, match="1x16x16 images but dataset digits"):
        evaluate(str(tmp_path / "m16"), cfg.data, FAST, cfg.runtime, echo=lambda s: None)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="sampler:steps"):
        EvalConfig(frontier=["ddim"])
    with pytest.raises(ValueError, match="nosuch"):
        EvalConfig(frontier=["nosuch:10"])
    with pytest.raises(ValueError, match=r"set evaluate\.on_ray: true"):
        EvalConfig(ray_gpus=1)


def test_configured_inception_weights_make_it_fid(models, tmp_path):
    """With evaluate.inception_weights the features are the FID Inception's (random weights
    here: the real file cannot be downloaded in CI) and the table says FID."""
    import safetensors.torch

    from diffusion.inception import FIDInceptionV3
    from tasks.evaluate import table

    torch.manual_seed(0)
    path = tmp_path / "fid_inception.safetensors"
    safetensors.torch.save_file(FIDInceptionV3().state_dict(), str(path))
    ecfg = FAST.model_copy(update={"inception_weights": str(path), "num_samples": 6,
                                   "max_real_images": 6, "frontier": ["ddim:5"],
                                   "nll_images": 0, "bootstrap_draws": 0})  # 2048-d: slow
    res, lines = run(models, "trained", ecfg)
    assert res["features"]["kind"] == "fid" and any("FID Inception-v3" in s for s in lines)
    assert "nll_bpd" not in res["metrics"]
    assert "| FID at default sampler (6 samples) |" in table(res)
    assert "fd_low" not in res["metrics"]  # bootstrap_draws=0: no interval
    with pytest.raises(EvalError, match="inception_weights"):
        run(models, "trained", ecfg.model_copy(update={"inception_weights": str(tmp_path / "x")}))


def test_on_ray_it_is_one_task_with_the_in_process_result(ray_local, models, monkeypatch):
    """evaluate.on_ray: the evaluation runs as a Ray task and gives what the flow process
    would; a stored result is then found without Ray; the worker's errors arrive as
    themselves."""
    import tasks.runtime
    from tasks.evaluate import run_evaluation

    cfg = models["cfg"]
    ecfg = FAST.model_copy(update={"seed": 77, "num_samples": 40, "frontier": ["ddim:5"],
                                   "nll_images": 4, "on_ray": True})
    lines = []
    res = run_evaluation(models["trained"], cfg.data, ecfg, cfg.runtime, echo=lines.append)
    assert not res["reused"] and any("as a Ray task (1 CPU)" in s for s in lines)
    local = evaluate(models["trained"], cfg.data, ecfg.model_copy(update={"on_ray": False}),
                     cfg.runtime, echo=lambda s: None, use_cache=False)
    assert res["eval_key"] == local["eval_key"]
    assert res["metrics"]["fd"] == pytest.approx(local["metrics"]["fd"], rel=1e-4)
    assert res["metrics"]["nll_bpd"] == pytest.approx(local["metrics"]["nll_bpd"], rel=1e-4)

    def no_ray(*a, **k):
        raise AssertionError("a stored evaluation must not need Ray")

    monkeypatch.setattr(tasks.runtime, "ensure_ray", no_ray)
    again = run_evaluation(models["trained"], cfg.data, ecfg, cfg.runtime, echo=lambda s: None)
    assert again["reused"] and again["eval_key"] == res["eval_key"]
    monkeypatch.undo()

    # the lookup runs here on the CPU; the worker asks for CUDA it does not have
    with pytest.raises(EvalError, match="CUDA is not available"):
        run_evaluation(models["trained"], cfg.data,
                       ecfg.model_copy(update={"seed": 78, "device": "cuda"}), cfg.runtime,
                       echo=lambda s: None)


def test_two_evaluations_storing_the_reference_network_at_once_leave_one_whole(tmp_path,
                                                                             monkeypatch):
    """Evaluation B fits and stores the dataset's reference network between evaluation A's
    writes of its weights and its config (two evaluations of one dataset version at once, each
    with its own fit): the store ends with one network, weights and config of the same writer,
    which both evaluations and every later one score with. (Before, A's config landed over B's
    weights and every later load failed its integrity check.)"""
    from diffusion.metrics import FeatureNet
    from tasks.evaluate import reference
    from tasks.storage import Location

    root = Location.of(str(tmp_path))
    manifest = {"name": "d", "version": "0" * 16, "shape": [1, 8, 8], "class_names": []}
    seeds = iter([1, 2])

    def fit(root, manifest, cfg, net_cfg, labelled, echo):  # two writers, two different nets
        torch.manual_seed(next(seeds))
        return FeatureNet(net_cfg).eval(), float("nan")

    monkeypatch.setattr(reference, "_fit_reference", fit)
    write, racing = reference.atomic_write_bytes, []

    def write_then_race(loc, data):
        write(loc, data)
        if not racing:  # A's first write: B runs start to end meanwhile
            racing.append(None)
            racing[0] = reference.reference_features(root, manifest, EvalConfig(), "cpu",
                                                     lambda s: None)

    monkeypatch.setattr(reference, "atomic_write_bytes", write_then_race)
    a = reference.reference_features(root, manifest, EvalConfig(), "cpu", lambda s: None)
    b = racing[0]
    later = reference.reference_features(root, manifest, EvalConfig(), "cpu", lambda s: None,
                                         stored_only=True)
    assert a.sha256 == b.sha256 == later.sha256
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    assert torch.equal(a(x), later(x)) and torch.equal(b(x), later(x))


def test_the_test_split_is_a_report_of_its_own_key_that_registration_refuses(models, tmp_path):
    """evaluate.split: test measures against the locked test images; the key differs from the
    val evaluation's, so the two never mix in the cache or the gate, and registering the model
    with it is refused (no decision reads the test split)."""
    from tasks.errors import RegistryError
    from tasks.registry import RegistryConfig, register_model

    val, _ = run(models, "trained")
    test, lines = run(models, "trained", FAST.model_copy(update={"split": "test"}))
    assert test["eval_key"] != val["eval_key"] and not test["reused"]
    m = open_dataset(models["cfg"].runtime.root_location(), "digits")[1]
    assert (val["dataset"]["split"], test["dataset"]["split"]) == ("val", "test")
    assert val["dataset"]["val_images"] == m["splits"]["val"]["rows"]
    assert test["dataset"]["val_images"] == m["splits"]["test"]["rows"] != m["splits"]["val"][
        "rows"]
    assert any("test images" in s for s in lines)
    assert test["metrics"]["fd"] != val["metrics"]["fd"]
    with pytest.raises(RegistryError, match=r"evaluate\.split=test.*evaluate\.split=val"):
        register_model(str(models["trained"]) + "/model", tracking_uri=f"file://{tmp_path}/mlruns",
                       run_id=None, cfg=RegistryConfig(), model_name="digits",
                       evaluation=test, lineage={}, defaults={})
    assert not (tmp_path / "mlruns").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"split\n.*'val' or 'test'"):
        EvalConfig(split="train")

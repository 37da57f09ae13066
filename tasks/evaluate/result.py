"""An evaluation's result: what makes two comparable, where it is stored, how it reads.

Sample i depends only on (``evaluate.seed``, i) and the sampler setting, and the real images are
a fixed split, so two models evaluated with the same settings are judged on the same evaluation
set and seeds. That identity is the ``eval_key``; the promotion gate compares two models only
under the same key. Results are cached at ``ROOT/evaluations/<weights sha[:16]>/<eval_key>.json``:
re-evaluating an unchanged model is a read.
"""

from __future__ import annotations

import hashlib
import json

from tasks.evaluate.config import EvalConfig
from tasks.evaluate.reference import Features
from tasks.storage import Location

FORMAT = "diffusion-pipeline/evaluation"
EVALUATIONS_DIR = "evaluations"
# The estimators' revision, part of every eval key: bump it when a stored figure's method
# changes, so evaluations stored by the old method are recomputed instead of reused.
# 2: KID and FD∞ stratified by class where samples are dealt from the reference's labels;
# 3: fd_matched (the model's FD at the floor's size), FD∞ only from 4 × the feature width rows.
ESTIMATORS = 3


def eval_key(manifest: dict, cfg: EvalConfig, features: Features, n_val: int) -> str:
    """What makes two evaluations comparable: the evaluation set (dataset version, split and its
    size), seeds, sample counts, sampler settings, the feature network and the estimators'
    revision (:data:`ESTIMATORS`)."""
    payload = {
        "dataset": [manifest["name"], manifest["version"]], "n_val": n_val,
        "features": [features.kind, features.sha256], "estimators": ESTIMATORS,
        **cfg.model_dump(include={"num_samples", "seed", "guidance_scale", "frontier",
                                  "tolerance", "nll_images", "memorization_threshold",
                                  "max_real_images", "bootstrap_draws", "interval_level",
                                  "split"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def result_location(root: Location, weights_sha256: str, key: str) -> Location:
    """Where the evaluation ``key`` of the model with these weights is stored."""
    return root.child(EVALUATIONS_DIR, weights_sha256[:16], f"{key}.json")


def features_location(result: Location) -> Location:
    """Beside the result ``<key>.json``: ``<key>.paired.safetensors``, the sample features,
    reference features and per-image NLL that a paired comparison of two models needs."""
    return Location(result.url.removesuffix(".json") + ".paired.safetensors", result.fs,
                    result.path.removesuffix(".json") + ".paired.safetensors")


def load_paired(evaluation: dict, options: dict | None = None) -> dict | None:
    """An evaluation's stored paired inputs (:func:`features_location` beside its
    ``stored_at``): ``{"setting": "<sampler>:<steps>" (its default), "arrays": {...},
    "samples": samples per setting, "seconds": what the evaluation took}``, or None where it has
    none (an evaluation stored before they were)."""
    import safetensors.numpy

    from tasks.storage import call

    stored = evaluation.get("stored_at")
    if not stored:
        return None
    loc = features_location(Location.of(stored, options))
    try:
        data = call(loc, loc.fs.cat_file, loc.path)
    except FileNotFoundError:
        return None
    d = evaluation["default_sampler"]
    return {"setting": f"{d['name']}:{d['steps']}", "arrays": safetensors.numpy.load(data),
            "samples": (evaluation.get("config") or {}).get("num_samples"),
            "seconds": evaluation.get("seconds")}


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def with_interval(d: dict, key: str) -> str:
    """``d[key]`` and, where recorded, its interval ``[key_low, key_high]``; where the estimate
    is biased and the interval is for the bias-corrected value (an FD: ``key_corrected``), that
    value too, which the interval surrounds: ``0.599 (0.000 [0.000, 0.153])``."""
    low, high = d.get(f"{key}_low"), d.get(f"{key}_high")
    text = f"{d[key]:.3f}"
    if low is None or high is None:
        return text
    corrected = d.get(f"{key}_corrected")
    if corrected is None:
        return f"{text} [{low:.3f}, {high:.3f}]"
    return f"{text} ({corrected:.3f} [{low:.3f}, {high:.3f}])"


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _fidelity(m: dict) -> str:
    """KID, FD∞, precision/recall and class accuracy with their floors, for a result that has
    them (those stored before them do not: empty)."""
    if "kid" not in m:
        return ""
    kid = "n/a" if m["kid"] is None else with_interval(m, "kid")
    text = (f"; KID {kid} (floor {_num(m.get('kid_floor'))}), FD∞ {_num(m.get('fd_inf'))} "
            f"(floor {_num(m.get('fd_inf_floor'))}), precision {_share(m.get('precision'))} / "
            f"recall {_share(m.get('recall'))} (floor {_share(m.get('precision_floor'))} / "
            f"{_share(m.get('recall_floor'))})")
    if m.get("class_accuracy") is not None:
        text += (f", class accuracy {_share(m['class_accuracy'])} (floor "
                 f"{_share(m.get('class_accuracy_floor'))})")
    return text


def _matched(result: dict) -> str:
    """The summary's note on the floor where it holds fewer images than there are samples: the
    floor's size and the model's FD at that size (``fd_matched``), the pair to compare."""
    m = result["metrics"]
    n = result["dataset"].get("floor_images")
    if m.get("fd_matched") is None or not n or n >= result["config"]["num_samples"]:
        return ""
    return f" at {n} images against the model's {m['fd_matched']:.3f} at {n} samples"


def summary(result: dict, stored_at: str) -> str:
    """The evaluation in one line: the headline distance, its floor and the best, memorization,
    and where recorded the size-free figures (KID, FD∞), precision/recall and class accuracy."""
    m, d = result["metrics"], result["default_sampler"]
    return (f"FD {with_interval(m, 'fd')} at {d['name']}:{d['steps']} (floor "
            f"{_num(m['fd_floor'])}{_matched(result)}, best "
            f"{m['fd_best']:.3f}); memorization {m['memorization']:.1%} (floor "
            f"{m['memorization_floor']:.1%}){_fidelity(m)}; stored {stored_at}")


def table(result: dict) -> str:
    """The evaluation as a markdown table (CLI output, Prefect artifact, MLflow artifact)."""
    m = result["metrics"]
    kind = "FID" if result["features"]["kind"] == "fid" else "FD (reference net)"
    draws = result["config"].get("bootstrap_draws")
    level = (f" [{result['config'].get('interval_level', 0.95):.0%} interval, {draws} "
             "bootstrap draws]" if draws and "fd_low" in m else "")
    if "fd_corrected" in m:
        level = (f" (FD bias-corrected [{result['config'].get('interval_level', 0.95):.0%} "
                 f"interval, {draws} bootstrap draws])")
    lines = [
        f"Evaluation {result['eval_key']} on {result['dataset']['name']}@"
        f"{result['dataset']['version']} ({result['dataset']['val_images']} "
        f"{result['dataset'].get('split', 'val')} images)",
        "",
        f"| metric | value{level} | floor |",
        "|---|---:|---:|",
        f"| {kind} at default sampler ({result['config']['num_samples']} samples) | "
        f"{with_interval(m, 'fd')} | {_num(m['fd_floor'])} "
        f"({result['dataset'].get('floor_images', '?')} held-out real) |",
    ]
    if m.get("fd_matched") is not None and m["fd_matched"] != m["fd"]:
        n = result["dataset"].get("floor_images")
        lines.append(f"| {kind} at the floor's size ({n} samples) | {m['fd_matched']:.3f} | "
                     f"{_num(m['fd_floor'])} |")
    if "nll_bpd" in m:
        nll = (with_interval(m, "nll_bpd") if "nll_bpd_low" in m
               else f"{m['nll_bpd']:.3f} ± {m['nll_bpd_se']:.3f}")
        lines.append(f"| NLL bits/dim | {nll} | |")
    lines.append(f"| memorization | {m['memorization']:.1%} | {m['memorization_floor']:.1%} |")
    if "kid" in m:  # results stored before these figures have none
        kid = "n/a" if m["kid"] is None else with_interval(m, "kid")
        rows = (result.get("fidelity") or {}).get("precision_recall_rows", "?")
        lines += [
            f"| KID (unbiased, any sample size) | {kid} | {_num(m.get('kid_floor'))} |",
            f"| FD∞ (extrapolated to infinite N) | {_num(m.get('fd_inf'))} | "
            f"{_num(m.get('fd_inf_floor'))} |",
            f"| precision / recall (k-NN, {rows} rows) | {_share(m.get('precision'))} / "
            f"{_share(m.get('recall'))} | "
            f"{_share(m.get('precision_floor'))} / {_share(m.get('recall_floor'))} |",
        ]
        if m.get("class_accuracy") is not None:
            lines.append(f"| class accuracy (reference net) | {_share(m['class_accuracy'])} | "
                         f"{_share(m.get('class_accuracy_floor'))} (val) |")
    lines += [
        "",
        "| sampler | steps | NFE | distance | images/s | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    d = result["default_sampler"]
    for f in result["frontier"]:
        mark = "default" if (f["sampler"], f["steps"]) == (d["name"], d["steps"]) else ""
        lines.append(f"| {f['sampler']} | {f['steps']} | {f['nfe']} | {with_interval(f, 'fd')} | "
                     f"{f['images_per_s']:.1f} | {mark} |")
    return "\n".join(lines)

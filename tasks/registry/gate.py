"""The promotion gate: does a challenger deserve to become ``champion``?

It must pass ``registry.thresholds`` (the only gate for the first champion) and beat the current
champion by ``registry.margin`` on ``registry.metric``, judged on the same evaluation set and
seeds (``eval.key``). A challenger already rejected against the same champion under the same
policy keeps its recorded verdict.

**Signal, not noise.** Under one ``eval.key`` sample i of both models comes from the same noise
and label, so the two are compared *paired*: the gate bootstraps the difference of the metric
(FD at the challenger's default sampler, or the mean per-image NLL) over the same resampled
samples and reference rows of both, and promotes only when the whole
``registry.interval_level`` interval of the difference clears the margin. A difference within
the noise is rejected and says so, with its interval.

**Never unpaired.** Where the champion has no stored paired inputs under the challenger's key,
``evaluate`` re-evaluates it there (storing them) and the gate asks again; where paired inputs
still cannot be had (the challenger's own evaluation lacks them, no ``paired`` loader was given)
the challenger is refused, *not judged*, with what to do: two recorded point values compared at
margin 0 would promote an equally good model half the time.

**A broken champion** (its metric NaN or infinite) cannot be compared with: the challenger is
refused, naming the champion, its metric and value, and the command that replaces it
(``promote --replace-broken-champion``: the challenger then passes on the absolute gates alone,
and the override is recorded).

**The floor.** Every candidate, the first champion included, must pass the absolute gates:
``registry.thresholds`` and fd <= ``registry.max_fd_over_floor`` × ``fd_floor``, what held-out
real images score against the same val split (``tasks.evaluate``); without a floor it is
refused. With the default empty thresholds this is what keeps a garbage first model out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from tasks.errors import RegistryError
from tasks.registry.config import EVAL_KEY_TAG, LOWER_IS_BETTER, WEIGHTS_TAG, RegistryConfig

REPLACE_BROKEN = "--replace-broken-champion"


def _eval_value(mv, metric: str) -> float | None:
    v = (mv.tags or {}).get(f"eval.{metric}")
    return None if v is None else float(v)


def _floor_gate(mv, cfg: RegistryConfig) -> tuple[bool, str] | None:
    """fd_matched (the model's FD at the floor's size; fd for evaluations that predate it) <=
    ``registry.max_fd_over_floor`` × fd_floor (None: the setting is off)."""
    factor = cfg.max_fd_over_floor
    if factor is None:
        return None
    # the model's FD at the floor's size where recorded (evaluations since issue 26): an FD's
    # small-sample bias grows as the count shrinks, so fd at 1000 samples against a floor of a
    # few hundred real images would flatter the model
    matched = _eval_value(mv, "fd_matched")
    name = "fd_matched" if matched is not None else "fd"
    fd = matched if matched is not None else _eval_value(mv, "fd")
    floor = _eval_value(mv, "fd_floor")
    if fd is None or not math.isfinite(fd):
        return False, (f"v{mv.version} {name} is {fd}: registry.max_fd_over_floor needs a "
                       f"number (eval.{name})")
    if floor is None or not math.isfinite(floor) or floor < 0:
        return False, (
            f"v{mv.version} has no eval.fd_floor (its evaluation could not hold out real "
            "images for the real-vs-real floor, or predates it), which "
            f"registry.max_fd_over_floor={factor:g} compares fd with; re-evaluate and register "
            "it again, or set registry.max_fd_over_floor: null and an explicit "
            "registry.thresholds.fd")
    if fd > factor * floor:
        return False, (f"v{mv.version} {name} {fd:g} exceeds {factor:g} × eval.fd_floor "
                       f"{floor:g} (= {factor * floor:g}, registry.max_fd_over_floor): far from "
                       "what real images score")
    return True, f"{name} {fd:g} <= {factor:g} × fd_floor {floor:g}"


def _gate(mv, cfg: RegistryConfig) -> tuple[bool, str]:
    """The absolute gates on a version's recorded evaluation: ``registry.thresholds`` and
    ``registry.max_fd_over_floor``."""
    for metric, bound in sorted(cfg.thresholds.items()):
        v = _eval_value(mv, metric)
        lower = LOWER_IS_BETTER[metric]
        if v is None:
            return False, f"v{mv.version} has no eval.{metric} for the threshold {bound:g}"
        if not math.isfinite(v) or (v > bound if lower else v < bound):
            return False, (f"v{mv.version} {metric} {v:g} fails the threshold "
                           f"{'<=' if lower else '>='} {bound:g}")
    passed = [f"{m} {'<=' if LOWER_IS_BETTER[m] else '>='} {b:g}"
              for m, b in sorted(cfg.thresholds.items())]
    floor = _floor_gate(mv, cfg)
    if floor is not None:
        if not floor[0]:
            return floor
        passed.append(floor[1])
    return True, "passes " + (", ".join(passed) or "(no thresholds set)")


def improvement(challenger: float, champion: float, metric: str) -> float:
    """Relative improvement of the challenger over the champion (positive: better)."""
    diff = champion - challenger if LOWER_IS_BETTER[metric] else challenger - champion
    return diff / max(abs(champion), 1e-12)


def _policy(cfg: RegistryConfig) -> str:
    """The gate's settings as recorded on a judged version (``promotion.policy``)."""
    return json.dumps({"metric": cfg.metric, "margin": cfg.margin,
                       "thresholds": cfg.thresholds, "interval_level": cfg.interval_level,
                       "bootstrap_draws": cfg.bootstrap_draws,
                       "max_fd_over_floor": cfg.max_fd_over_floor}, sort_keys=True)


# paired(model_ref) -> {"setting": "<sampler>:<steps>", "arrays": {...}} or None: a version's
# stored paired inputs under the challenger's eval key (tasks.evaluate's .paired.safetensors)
Paired = Callable[[str], dict | None]


def paired_difference(a: dict, b: dict, metric: str, cfg: RegistryConfig):
    """The paired interval of ``metric``(a) − ``metric``(b), from two evaluations' paired inputs
    under one eval key (FD at ``a``'s default sampler setting); None where they lack what it
    needs."""
    import torch

    from diffusion.metrics import paired_frechet_difference, paired_mean_difference

    xa, xb = a["arrays"], b["arrays"]
    if metric == "fd":
        key = f"samples/{a['setting']}"
        if key not in xa or key not in xb or "reference" not in xa:
            return None
        # where both evaluations stored the labels the samples were dealt with (the same under
        # one eval key), rows are resampled within their label, as sample sets dealt from those
        # labels vary; evaluations stored before the labels were resample freely (wider)
        strata = {}
        if all(k in x for x in (xa, xb) for k in ("labels", "reference_labels")):
            strata = {"labels": torch.from_numpy(xa["labels"]),
                      "reference_labels": torch.from_numpy(xa["reference_labels"])}
        return paired_frechet_difference(
            torch.from_numpy(xa[key]), torch.from_numpy(xb[key]),
            torch.from_numpy(xa["reference"]), draws=cfg.bootstrap_draws,
            level=cfg.interval_level, **strata)
    if metric == "nll_bpd" and "nll" in xa and "nll" in xb:
        return paired_mean_difference(torch.from_numpy(xa["nll"]), torch.from_numpy(xb["nll"]),
                                      draws=cfg.bootstrap_draws, level=cfg.interval_level)
    return None


def samples_to_resolve(d, samples: int) -> int | None:
    """About how many samples per model would make an interval like ``d`` (from ``samples``
    each) exclude 0 at its own difference, where the samples are its only noise (a fixed
    reference): the width of a paired interval then shrinks as 1/sqrt(N), so
    N' = N · (half-width / |difference|)², the difference being the interval's centre (the
    bias-corrected estimate where the interval has one). None without a difference to
    resolve."""
    half = (d.high - d.low) / 2
    centre = d.center
    if not samples or centre == 0 or not math.isfinite(half):
        return None
    need = samples * (half / abs(centre)) ** 2
    return int(float(f"{need:.2g}"))  # two significant digits: it is an estimate


def _resolution_hint(d, samples: int | None, reference: int | None) -> str:
    """What would narrow an interval that holds 0: more samples, or (where the held-out
    reference is small and resampled too, and its noise dominates) a larger reference."""
    from diffusion.metrics import RESAMPLE_REFERENCE_BELOW

    if reference is not None and reference < RESAMPLE_REFERENCE_BELOW:
        return (f"; with {reference} reference images (resampled too) their noise dominates "
                "the width and more samples narrow it little: a larger held-out split "
                "(data.val_fraction) narrows it")
    more = samples_to_resolve(d, samples)
    if more and samples and more > samples:
        return (f"; a difference this size would take about {more} samples per model to tell "
                "from noise (evaluate.num_samples)")
    return ""


def _verdict(metric: str, d, champ_value: float, champ, cfg: RegistryConfig,
             samples: int | None = None, reference: int | None = None) -> tuple[bool, str]:
    """Promote iff the interval's bound on the better side clears the margin: for a metric
    where lower is better, high < −margin·|champion|, and high < 0 even at margin 0."""
    lower = LOWER_IS_BETTER[metric]
    need = cfg.margin * abs(champ_value)
    bound = d.high if lower else -d.low  # the least improvement the interval allows, negated
    each = f", {samples} samples each" if samples else ""
    text = (f"{metric} {d.center:+.3f} [{d.low:+.3f}, {d.high:+.3f}] vs champion "
            f"v{champ.version} ({cfg.interval_level:.0%} paired interval, {d.draws} draws{each})")
    if bound < -need and bound < 0:
        return True, (f"{text}: better beyond the noise, clearing the required "
                      f"{cfg.margin:.2%} improvement")
    if d.low <= 0 <= d.high:
        hint = _resolution_hint(d, samples, reference) if metric == "fd" else ""
        return False, f"{text}: not distinguishable (the interval holds 0){hint}"
    if (d.low > 0) == lower:
        return False, f"{text}: worse than the champion"
    return False, (f"{text}: better, but the interval's bound misses the required "
                   f"{cfg.margin:.2%} improvement ({-need if lower else need:+.3f})")


def _no_paired_inputs(mv, key: str | None) -> str:
    sha = (mv.tags or {}).get(WEIGHTS_TAG, "")[:16] or "<weights sha256[:16]>"
    return (f"v{mv.version} has no stored paired inputs under eval.key {key} (its evaluation "
            "was stored before they were, or they were removed); delete that evaluation, "
            f"evaluations/{sha}/{key}.json under the pipeline root, and rerun promote, which "
            "evaluates it afresh and stores them")


def _paired_inputs(name: str, chall, champ, evaluate: Callable[[str], dict] | None,
                   paired: Paired | None) -> tuple[dict | None, dict | None, str | None]:
    """Both versions' paired inputs under the challenger's eval key, the champion re-evaluated
    there (``evaluate``, which stores them) when it has none: ``(challenger's, champion's,
    None)``, or ``(…, why they cannot be had)``."""
    key = (chall.tags or {}).get(EVAL_KEY_TAG)
    if paired is None:
        return None, None, ("the gate was given no loader of the evaluations' stored paired "
                            "inputs (promote(paired=...); the promote command and flow pass one)")
    a = paired(f"models:/{name}/{chall.version}")
    if a is None:
        return None, None, _no_paired_inputs(chall, key)
    ref = f"models:/{name}/{champ.version}"
    b = paired(ref)
    if b is None and evaluate is not None:
        _reevaluate(name, champ, key, evaluate)
        b = paired(ref)
    if b is None:
        return a, None, _no_paired_inputs(champ, key)
    return a, b, None


def _unpaired(metric: str, a: dict, b: dict) -> str:
    """Why two evaluations' paired inputs hold nothing to compare ``metric`` with."""
    if metric == "nll_bpd":
        return "their paired inputs hold no per-image NLL (evaluate.nll_images is 0)"
    missing = [k for k in (f"samples/{a['setting']}", "reference") if k not in a["arrays"]
               or k not in b["arrays"]]
    return f"their paired inputs lack {', '.join(missing) or 'what fd needs'}"


def _judge(name: str, chall, chall_value: float, champ, cfg: RegistryConfig,
           evaluate: Callable[[str], dict] | None,
           paired: Paired | None = None,
           replace_broken: bool = False) -> tuple[bool, str, dict]:
    """``(promote?, reason, {"champion_value", "improvement", "difference"...} when compared
    with a champion)``: the absolute gates first, then the margin over ``champ`` (None: the
    first champion) on the paired interval of the difference. ``"undecided": True`` marks a
    refusal that is no verdict on the challenger (no paired inputs, a broken champion): it is
    not kept as an earlier rejection. ``replace_broken``: an operator's request to replace a
    broken champion with a challenger that passes the absolute gates."""
    metric = cfg.metric
    ok, reason = _gate(chall, cfg)
    if not math.isfinite(chall_value):
        ok, reason = False, f"v{chall.version} {metric} is {chall_value}, not a number to judge"
    if not ok:
        return False, reason, {}
    if champ is None:
        return True, f"first champion: {reason}", {}
    champ_value = _champion_value(name, chall, champ, metric, evaluate)
    if not math.isfinite(champ_value):
        key = (chall.tags or {}).get(EVAL_KEY_TAG)
        broken = {"version": str(champ.version), "metric": metric, "value": champ_value}
        compared = {"champion_value": champ_value, "champion_broken": broken}
        if replace_broken:
            return True, (f"replaces the broken champion v{champ.version} ({metric} "
                          f"{champ_value}) on an operator's request ({REPLACE_BROKEN}), "
                          f"judged on the absolute gates alone: {reason}"), compared | {
                              "override": "replace_broken_champion"}
        return False, (
            f"not judged: champion v{champ.version} is broken: its {metric} is {champ_value} "
            f"under eval.key {key}, not a number a challenger can be compared with; to replace "
            f"it with v{chall.version} (judged on the absolute gates alone, the override "
            f"recorded): diffusion-pipeline promote --version {chall.version} {REPLACE_BROKEN}"
        ), compared | {"undecided": True}
    note = (f" ({REPLACE_BROKEN} has no effect: champion v{champ.version} is not broken)"
            if replace_broken else "")
    gain = improvement(chall_value, champ_value, metric)
    compared = {"champion_value": champ_value, "improvement": gain, "paired": False}
    a, b, missing = _paired_inputs(name, chall, champ, evaluate, paired)
    d = paired_difference(a, b, metric, cfg) if missing is None else None
    if d is None:
        why = missing or _unpaired(metric, a, b)
        return False, (f"not judged: {metric} {chall_value:g} vs champion v{champ.version} "
                       f"{champ_value:g} cannot be compared paired: {why}; the gate never "
                       f"promotes on recorded values compared unpaired{note}"), compared | {
                           "undecided": True}
    samples = a.get("samples") if metric == "fd" else len(a["arrays"]["nll"])
    reference = len(a["arrays"]["reference"]) if "reference" in a["arrays"] else None
    ok, reason = _verdict(metric, d, champ_value, champ, cfg, samples, reference)
    seconds = [x.get("seconds") for x in (a, b)]
    compared |= {"difference": d.center, "difference_low": d.low, "difference_high": d.high,
                 "paired": True, "samples": samples,
                 "eval_seconds": (sum(seconds) if all(isinstance(x, (int, float))
                                                      for x in seconds) else None)}
    return ok, reason + note, compared


def _earlier_rejection(chall, champion: str | None, policy: str) -> dict | None:
    """The recorded verdict when ``chall`` was already rejected against this same champion
    under the same policy (metric, margin, thresholds): judging again would re-evaluate a
    champion and rewrite the same tags for the same answer, on every unchanged scheduled run.
    A new champion or a changed policy is judged afresh."""
    tags = chall.tags or {}
    if (tags.get("promotion.decision") != "rejected"
            or tags.get("promotion.against") != (str(champion) if champion else "none")
            or tags.get("promotion.policy") != policy):
        return None
    recorded = tags.get("promotion.champion_value", "none")
    return {"reason": f"{tags.get('promotion.reason', 'rejected')} (decided at "
                      f"{tags.get('promotion.at', '?')}; unchanged since)",
            "champion_value": None if recorded == "none" else float(recorded),
            "decided_at": tags.get("promotion.at"), "reused": True}


def _reevaluate(name: str, champ, key: str | None,
                evaluate: Callable[[str], dict]) -> dict:
    """The champion evaluated on the challenger's set and seeds (eval.key ``key``)."""
    ev = evaluate(f"models:/{name}/{champ.version}")
    if str(ev.get("eval_key")) != str(key):
        raise RegistryError(f"re-evaluating {name} v{champ.version} gave eval_key "
                            f"{ev.get('eval_key')}, not the challenger's {key}; the evaluate "
                            "callable must use the challenger's set and seeds")
    return ev


def _champion_value(name: str, chall, champ, metric: str,
                    evaluate: Callable[[str], dict] | None) -> float:
    key = (chall.tags or {}).get(EVAL_KEY_TAG)
    if (champ.tags or {}).get(EVAL_KEY_TAG) == key:
        v = _eval_value(champ, metric)
        if v is not None:
            return v
    if evaluate is None:
        raise RegistryError(
            f"{name} champion v{champ.version} was evaluated on another set or seeds (eval.key "
            f"{(champ.tags or {}).get(EVAL_KEY_TAG)} vs {key}); pass evaluate= to re-evaluate it "
            "on the challenger's set, or evaluate both the same way")
    ev = _reevaluate(name, champ, key, evaluate)
    try:
        return float(ev["metrics"][metric])
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"re-evaluating {name} v{champ.version} gave no {metric}") from e

"""The promotion gate's rule without a registry (issue 26 item 3): a champion whose metric is
not a number is reported as broken, with the command that replaces it, and never compared with;
the gate never promotes on recorded values compared unpaired (it re-evaluates the champion
paired, or refuses and says why); and every candidate, the first champion included, must be
within ``registry.max_fd_over_floor`` × its evaluation's real-vs-real floor."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from tasks.registry import RegistryConfig
from tasks.registry.gate import _gate, _judge, _policy
from tests.helpers import ShiftedPaired

CFG = RegistryConfig(bootstrap_draws=200)  # enough to tell the differences below; fast
KEY = "a" * 16


def version(v: str, fd: float | None, floor: float | None = 1.0, key: str = KEY, **tags):
    t = {"eval.key": key, "weights_sha256": f"{v}" * 64, **tags}
    if fd is not None:
        t["eval.fd"] = repr(float(fd))
    if floor is not None:
        t["eval.fd_floor"] = repr(float(floor))
    return SimpleNamespace(version=v, tags=t)


def shifted(fds: dict[str, float]) -> ShiftedPaired:
    """Versions' paired inputs from their fds (:class:`tests.helpers.ShiftedPaired`); a version
    not in ``fds`` has none. ``.fds`` can be changed afterwards."""
    paired = ShiftedPaired(lambda ref: paired.fds.get(ref.rsplit("/", 1)[1]))
    paired.fds = dict(fds)
    return paired


def judge(chall, champ, cfg=CFG, evaluate=None, paired=None, **kw):
    value = float(chall.tags["eval.fd"])
    return _judge("m", chall, value, champ, cfg, evaluate, paired, **kw)


# ------------------------------------------------------------------------------------------
# a. A broken champion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["nan", "inf"])
def test_a_broken_champion_is_reported_with_the_command_that_replaces_it(broken):
    champ = version("1", float(broken))
    paired = shifted({"1": 2.0, "2": 1.5})
    ok, reason, compared = judge(version("2", 1.5), champ, paired=paired)
    assert not ok
    assert "+nan" not in reason and "%" not in reason  # no comparison with a non-number
    assert f"champion v1 is broken: its fd is {broken}" in reason
    assert "diffusion-pipeline promote --version 2 --replace-broken-champion" in reason
    assert paired.asked == []  # the challenger was not compared with it
    found = compared["champion_broken"]
    assert (found["version"], found["metric"], repr(found["value"])) == ("1", "fd", broken)
    assert compared.get("undecided")  # not a verdict on the challenger


def test_a_champion_that_re_evaluates_to_nan_is_broken_too():
    champ = version("1", 1.2, key="b" * 16)  # another set: re-evaluated on the challenger's
    ok, reason, _ = judge(
        version("2", 1.5), champ, paired=shifted({"1": 2.0, "2": 1.5}),
        evaluate=lambda ref: {"eval_key": KEY, "metrics": {"fd": float("nan")}})
    assert not ok and "champion v1 is broken: its fd is nan" in reason
    assert "under eval.key " + KEY in reason


def test_the_operator_override_replaces_a_broken_champion_on_the_absolute_gates_alone():
    champ = version("1", float("nan"))
    ok, reason, compared = judge(version("2", 1.5), champ, replace_broken=True)
    assert ok and "replaces the broken champion v1 (fd nan)" in reason
    assert "--replace-broken-champion" in reason and compared["override"] == \
        "replace_broken_champion"
    # the override skips the comparison, not the absolute gates
    ok, reason, _ = judge(version("3", 50.0), champ, replace_broken=True)
    assert not ok and "fd 50 exceeds" in reason
    # against a healthy champion it changes nothing, and says so
    ok, reason, _ = judge(version("2", 1.5), version("1", 1.0), replace_broken=True,
                          paired=shifted({"1": 1.0, "2": 1.5}))
    assert not ok and "has no effect: champion v1 is not broken" in reason


# ------------------------------------------------------------------------------------------
# b. Never an unpaired comparison of point values
# ------------------------------------------------------------------------------------------


def test_without_paired_inputs_the_gate_refuses_instead_of_comparing_point_values():
    """Two equally good models: the challenger's recorded FD is lower by chance. Compared
    unpaired at margin 0 it was promoted (half of such pairs are); now it is not judged."""
    ok, reason, compared = judge(version("2", 1.49), version("1", 1.5))
    assert not ok and compared.get("undecided") and compared["paired"] is False
    assert "not judged" in reason and "never promotes on recorded values compared unpaired" \
        in reason and "paired=" in reason


def test_a_challenger_without_stored_paired_inputs_is_refused_saying_what_to_do():
    ok, reason, compared = judge(version("2", 1.0), version("1", 1.5),
                                 paired=shifted({"1": 1.5}))
    assert not ok and compared.get("undecided")
    assert f"v2 has no stored paired inputs under eval.key {KEY}" in reason
    assert f"evaluations/{'2' * 16}/{KEY}.json" in reason and "rerun promote" in reason


def test_a_champion_without_paired_inputs_is_re_evaluated_then_compared_paired():
    paired = shifted({"2": 1.0})
    evaluated = []

    def evaluate(ref):  # stores the champion's paired inputs under the challenger's key
        evaluated.append(ref)
        paired.fds["1"] = 3.0
        return {"eval_key": KEY, "metrics": {"fd": 3.0}}

    ok, reason, compared = judge(version("2", 1.0), version("1", 3.0), paired=paired,
                                 evaluate=evaluate)
    assert evaluated == ["models:/m/1"] and paired.asked == ["models:/m/2", "models:/m/1",
                                                             "models:/m/1"]
    assert ok and compared["paired"] and compared["difference_high"] < 0
    assert "better beyond the noise" in reason


def test_a_champion_still_without_paired_inputs_is_refused_naming_it():
    ok, reason, compared = judge(version("2", 1.0), version("1", 3.0),
                                 paired=shifted({"2": 1.0}),
                                 evaluate=lambda ref: {"eval_key": KEY, "metrics": {"fd": 3.0}})
    assert not ok and compared.get("undecided")
    assert f"v1 has no stored paired inputs under eval.key {KEY}" in reason


def test_memorization_cannot_be_the_compared_metric():
    with pytest.raises(ValidationError, match=r"registry.metric memorization .* paired"):
        RegistryConfig(metric="memorization")
    RegistryConfig(thresholds={"memorization": 0.1})  # as an absolute gate it still serves


# ------------------------------------------------------------------------------------------
# c. The first champion: within a factor of the real-vs-real floor
# ------------------------------------------------------------------------------------------


def test_the_first_champion_must_be_within_the_default_factor_of_the_floor():
    factor = CFG.max_fd_over_floor
    assert factor is not None and factor > 1
    garbage = version("1", 40.0 * factor, floor=0.5)
    ok, reason, _ = judge(garbage, None)
    assert not ok and f"v1 fd {40.0 * factor:g} exceeds {factor:g} × eval.fd_floor 0.5" in reason
    assert "registry.max_fd_over_floor" in reason
    ok, reason, _ = judge(version("2", 0.9 * factor * 0.5, floor=0.5), None)
    assert ok and reason.startswith("first champion: passes fd") and \
        f"<= {factor:g} × fd_floor 0.5" in reason


def test_the_floor_rule_compares_the_fd_at_the_floors_size_where_recorded():
    """fd at 1000 samples against a floor of a few hundred real images flatters the model (an
    FD's small-sample bias grows as the count shrinks): where the evaluation recorded the
    model's FD at the floor's size (eval.fd_matched), the rule compares that."""
    factor = CFG.max_fd_over_floor
    flattered = version("1", 0.5 * factor, floor=1.0, **{"eval.fd_matched": repr(3.0 * factor)})
    ok, reason = _gate(flattered, CFG)
    assert not ok and f"v1 fd_matched {3.0 * factor:g} exceeds {factor:g} × eval.fd_floor 1" \
        in reason
    fine = version("2", 0.5, floor=1.0, **{"eval.fd_matched": "1.5"})
    ok, reason = _gate(fine, CFG)
    assert ok and f"fd_matched 1.5 <= {factor:g} × fd_floor 1" in reason


def test_a_candidate_without_a_floor_is_refused():
    ok, reason, _ = judge(version("1", 1.0, floor=None), None)
    assert not ok and "v1 has no eval.fd_floor" in reason
    assert "registry.max_fd_over_floor" in reason
    ok, reason, _ = judge(version("1", 1.0, floor=float("nan")), None)
    assert not ok and "v1 has no eval.fd_floor" in reason


def test_the_floor_rule_adds_to_the_thresholds_and_can_be_switched_off():
    cfg = RegistryConfig(bootstrap_draws=200, thresholds={"fd": 0.8})
    ok, reason = _gate(version("1", 0.9), cfg)  # within the floor rule, not the threshold
    assert not ok and "fd 0.9 fails the threshold <= 0.8" in reason
    off = RegistryConfig(max_fd_over_floor=None)
    assert _gate(version("1", 1000.0, floor=None), off) == (True, "passes (no thresholds set)")
    # a change of the setting re-judges earlier rejections: it is in the recorded policy
    assert json.loads(_policy(CFG))["max_fd_over_floor"] == CFG.max_fd_over_floor
    assert json.loads(_policy(off))["max_fd_over_floor"] is None

"""The tests' fault hooks (tasks/faults.py) without Ray: the training loop's one hook is the
identity unless a job asks for a fault, acts only at its step and rank, and a bad spec is
refused before any step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks.faults import training_faults


def test_no_fault_is_the_identity():
    at = training_faults({}, rank=0, marker_dir="/nonexistent")
    x = torch.ones(2, 1, 2, 2)
    assert all(at(step, x) is x for step in range(1, 20))


def test_nan_poisons_only_its_step_on_every_rank():
    x = torch.ones(2, 1, 2, 2)
    for rank in (0, 1):
        at = training_faults({"fault": "nan@3"}, rank=rank, marker_dir="/nonexistent")
        assert at(2, x) is x and at(4, x) is x
        assert all(math.isnan(v) for v in at(3, x).flatten().tolist())


def test_lease_fault_hands_the_lock_to_another_driver_on_rank_0_only(tmp_path):
    job = {"fault": "lease@2", "lease": {"dir": str(tmp_path), "name": "_training"},
           "storage_options": {}}
    training_faults(job, rank=1, marker_dir=str(tmp_path))(2, torch.zeros(1))
    assert not (tmp_path / "_training.lock").exists()
    at = training_faults(job, rank=0, marker_dir=str(tmp_path))
    at(1, torch.zeros(1))
    assert not (tmp_path / "_training.lock").exists()
    at(2, torch.zeros(1))
    assert json.loads((tmp_path / "_training.lock").read_text())["token"] == "another-driver"


def test_a_kill_already_done_is_not_repeated_on_resume(tmp_path):
    """The marker of an earlier attempt's kill keeps the resumed attempt alive at that step."""
    (tmp_path / ".fault-kill-6").touch()
    x = torch.zeros(1)
    assert training_faults({"fault": "kill@6"}, rank=0, marker_dir=str(tmp_path))(6, x) is x


@pytest.mark.parametrize("spec", ["kill", "boom@3", "nan@x", "nan@0", "kill@-1"])
def test_a_bad_fault_spec_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match=rf"fault must be <kind>@<step> .*got '{spec}'"):
        training_faults({"fault": spec}, rank=0, marker_dir="/nonexistent")

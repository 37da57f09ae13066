"""Shared pytest configuration.

The diffusion tests loop over many small tensor operations (1000-step samplers, Markov chains).
On a 2-core machine with any other load, torch's intra-op thread pool turns each small op into a
contended barrier: measured 0.75 s single-threaded against 24 s with 2 threads for the same test.
So tests under tests/diffusion run with one torch thread (unless OMP_NUM_THREADS is set
explicitly), and the previous setting is restored afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DIFFUSION_TESTS = Path(__file__).parent / "diffusion"


@pytest.fixture(autouse=True)
def _single_torch_thread_for_diffusion(request):
    if "OMP_NUM_THREADS" in os.environ or _DIFFUSION_TESTS not in Path(request.path).parents:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

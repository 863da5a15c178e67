"""The likelihood-free sampler's CPU paths timed by pytest-benchmark: the exact sampler's control loop in C++
(csrc/exact_sampler.cpp) against its tensor-op reference, and the pool grouping (tensor ops), at batch 8 x 200 draws.

    python -m pytest benchmarks/test_bench_sampler.py
"""

from __future__ import annotations

import pytest
import torch

from calm_engine import native
from calm_engine.engine import sampler

ROWS, SAMPLES, K = 8, 200, 4


def pool(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 3, (ROWS, SAMPLES, K), generator=generator)
    valid = torch.ones(ROWS, SAMPLES, dtype=torch.bool)
    inv_floor, inv_frac = torch.full((ROWS,), 1), torch.full((ROWS,), 1 / 0.7 - 1, dtype=torch.float64)
    return patches, valid, inv_floor, inv_frac, torch.rand(ROWS, SAMPLES, generator=generator)


@pytest.mark.parametrize("implementation", ["csrc", "tensor_ops"])
def test_exact_choice(benchmark, implementation):
    if implementation == "csrc" and native.calm_cpu is None:
        pytest.skip("calm_engine._calm_cpu is not built")
    torch.set_num_threads(2)
    run = sampler.exact_choice if implementation == "csrc" else sampler.exact_choice_ref
    state = sampler.ExactState.start(ROWS, K, "cpu")
    benchmark(run, state, *pool())


def test_pool_counts(benchmark):
    torch.set_num_threads(2)
    patches, valid, *_ = pool()
    benchmark(sampler.pool_counts, patches, valid)


def test_approximate_choice(benchmark):
    torch.set_num_threads(2)
    benchmark(sampler.approximate_choice, *pool())

"""Likelihood-free sampling on pools of chunks from synthetic generators whose distribution is known exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from calm_engine.engine.sampler import ExactState, approximate_choice, candidate_weights, exact_choice, pool_counts
from tests.stats import empirical, total_variation, tv_threshold

# A synthetic generator: category i with probability P[i] is the K=2 chunk PATCHES[i].
P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
PATCHES = torch.tensor([[3, 1], [1, 3], [3, 3], [0, 7], [7, 0], [2, 2]])


def draw_pools(rows: int, samples: int) -> torch.Tensor:
    """[rows, samples, 2] chunks drawn i.i.d. from P."""
    return PATCHES[torch.multinomial(P, rows * samples, replacement=True).view(rows, samples)]


def tempered(inverse_temperature: float) -> dict:
    weights = P**inverse_temperature
    return {tuple(PATCHES[i].tolist()): float(w) for i, w in enumerate(weights / weights.sum())}


def split(inverse_temperature: float, rows: int):
    n = int(inverse_temperature + 1e-9)
    return torch.full((rows,), n), torch.full((rows,), inverse_temperature - n, dtype=torch.float64)


def test_pool_counts_match_counter():
    chunks = torch.randint(0, 3, (4, 37, 3))
    valid = torch.rand(4, 37) < 0.8
    counts = pool_counts(chunks, valid)
    for row in range(4):
        seen = Counter(tuple(p) for p, v in zip(chunks[row].tolist(), valid[row].tolist(), strict=True) if v)
        for j in range(37):
            expected = seen[tuple(chunks[row, j].tolist())] if valid[row, j] else 0
            assert counts[row, j] == expected


@pytest.mark.parametrize("n", [2, 3])
def test_candidate_weights_are_the_official_binomials(n):
    """For T = 1/n the weights are C(count, m) over chunks seen at least m times, m cascading down from n."""
    chunks = torch.tensor([[1], [2], [1], [3], [2], [1], [4]])
    counts = {1: 3, 2: 2, 3: 1, 4: 1}
    m = min(n, max(counts.values()))
    expected = {(x,): math.comb(c, m) for x, c in counts.items() if c >= m}
    total = sum(expected.values())
    got = candidate_weights(chunks, torch.ones(7, dtype=torch.bool), float(n))
    assert [x for x, _, _ in got] == list(expected)  # first-appearance order, as the official code lists them
    for x, count, probability in got:
        assert count == counts[x[0]]
        assert probability == pytest.approx(expected[x] / total, rel=1e-12)


def test_cascade_falls_back_when_no_patch_repeats_enough():
    chunks = torch.tensor([[[5], [6], [7], [6]]])
    index = approximate_choice(chunks, torch.ones(1, 4, dtype=torch.bool), *split(3.0, 1), torch.rand(1, 4))
    assert chunks[0, index[0], 0] == 6  # seen twice: the only candidate at level 2


@pytest.mark.parametrize("inverse_temperature", [2.0, 1 / 0.7])
def test_approximate_choice_follows_its_weights(inverse_temperature):
    """The exponential race picks each chunk of a fixed pool with the probability its weight says."""
    pool = draw_pools(1, 30)
    rows = 20000
    chunks, valid = pool.expand(rows, -1, -1), torch.ones(rows, 30, dtype=torch.bool)
    index = approximate_choice(chunks, valid, *split(inverse_temperature, rows), torch.rand(rows, 30))
    chosen = [tuple(p) for p in chunks[torch.arange(rows), index].tolist()]
    expected = {x: w for x, _, w in candidate_weights(pool[0], valid[0], inverse_temperature)}
    assert total_variation(empirical(chosen), expected) < tv_threshold(expected, rows)


@pytest.mark.parametrize("inverse_temperature", [2.0, 1 / 0.7])
def test_approximate_choice_converges_to_the_tempered_distribution(inverse_temperature):
    """With a large pool the generalised Algorithm 2 samples P^(1/T)/Z (its bias vanishes as N grows)."""
    rows, samples = 10000, 400
    index = approximate_choice(
        pools := draw_pools(rows, samples),
        torch.ones(rows, samples, dtype=torch.bool),
        *split(inverse_temperature, rows),
        torch.rand(rows, samples),
    )
    chosen = [tuple(p) for p in pools[torch.arange(rows), index].tolist()]
    target = tempered(inverse_temperature)
    bound = tv_threshold(target, rows) + 0.01  # + an allowance for the estimator's O(1/N) bias at N = 400
    assert total_variation(empirical(chosen), target) < bound
    # Sampling at T = 1, or at the neighbouring T = 1/n, would fail by a wide margin:
    for wrong in (1.0, float(math.ceil(inverse_temperature - 1e-9)) if inverse_temperature % 1 else 1.0):
        assert total_variation(tempered(wrong), target) > 2 * bound


def run_exact(inverse_temperature: float, rows: int, samples: int, pools: int) -> tuple[list, torch.Tensor]:
    state = ExactState.start(rows, 2, "cpu")
    n, a = split(inverse_temperature, rows)
    for _ in range(pools):
        state = exact_choice(
            state,
            draw_pools(rows, samples),
            torch.ones(rows, samples, dtype=torch.bool),
            n,
            a,
            torch.rand(rows, samples),
        )
    return [tuple(p) for p in state.chosen.tolist()], state.done


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 0.7])
def test_exact_sampler_samples_the_tempered_distribution(temperature):
    rows = 20000
    chosen, done = run_exact(1 / temperature, rows, samples=64, pools=6)
    assert bool(done.all()), "the pool bound was hit; the test needs more pools"
    target = tempered(1 / temperature)
    assert total_variation(empirical(chosen), target) < tv_threshold(target, rows)
    # Plain T = 1 samples or the T = 1/2 distribution at T = 0.7 would be caught:
    assert total_variation(tempered(1.0), target) > 2 * tv_threshold(target, rows)
    if temperature == 0.7:
        assert total_variation(tempered(2.0), target) > 2 * tv_threshold(target, rows)


def test_exact_sampler_at_t1_takes_the_first_draw():
    pools = draw_pools(50, 5)
    state = exact_choice(
        ExactState.start(50, 2, "cpu"), pools, torch.ones(50, 5, dtype=torch.bool), *split(1.0, 50), torch.rand(50, 5)
    )
    assert bool(state.done.all()) and torch.equal(state.chosen, pools[:, 0])


def test_exact_sampler_respects_invalid_draws_and_reports_exhaustion():
    """Draws marked invalid are never used; a row whose draws never repeat n times is not done."""
    chunks = torch.tensor([[[1, 1], [2, 2], [1, 1], [1, 1]], [[4, 4], [5, 5], [6, 6], [7, 7]]])
    valid = torch.tensor([[True, True, False, True], [True] * 4])
    state = exact_choice(ExactState.start(2, 2, "cpu"), chunks, valid, *split(2.0, 2), torch.rand(2, 4))
    assert state.done.tolist() == [False, False]  # row 0: 1, 2 (restart), [skip], 1 -> one match only

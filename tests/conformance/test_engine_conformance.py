"""Conformance of the engine (generate and the temperature sampler) with the official implementation.

- generate_t1*: the engine, fed the recorded noise, returns the official output ids exactly.
- temperature_sampling_t05: the engine's candidate counts and choice probabilities on the recorded pool equal the
  official C(count, n) weights.
- sampler_stats: the engine's output distributions at T = 1 and T = 0.5 (N = 200) for the fixture's hidden state
  match the official empirical ones, within a total-variation bound derived from both sample sizes (tests/stats.py);
  the fixture's negative controls (T = 1 output for T = 0.5, uniform choice among candidates) lie far outside it.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

from calm_engine import LLM, SamplingParams
from calm_engine.engine.noise import COUNTERS_PER_STEP
from calm_engine.engine.sampler import SamplingBatch, candidate_weights
from tests.conformance.conftest import _calm
from tests.conformance.test_conformance import require
from tests.stats import total_variation, tv_threshold

GENERATE_CASES = ["generate_t1", "generate_t1_eos", "generate_t1_unaligned"]


def recorded_noise(noise: torch.Tensor):
    """A noise source answering request `seed` at step t with the case's noise[t, seed], as the reference drew it."""

    def source(seeds, counters, samples, dim):
        assert samples == 1 and bool((counters % COUNTERS_PER_STEP == 0).all()), "T = 1 draws only"
        return noise[counters // COUNTERS_PER_STEP, seeds][:, None, :dim]

    return source


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_generate_output_ids(fixture, model, name):
    """The reference generate() with the recorded noise: same ids, same stopping, same pad handling.

    The official rules are asked for explicitly: right padding of a partial prompt chunk, the whole chunk that holds
    eos is kept (keep_eos_chunk), and the length limit counts the padded prompt (max_length - padded prompt).
    """
    case = require(fixture, name)
    prompts = fixture.input(name, 0)
    noise = fixture.input(name, 1)
    k, pad = model.config.patch_size, model.config.pad_token_id
    expected = fixture.output(name, "output_ids")
    max_length = expected.shape[1]
    padded_prompt = prompts.shape[1] + (-prompts.shape[1] % k)
    eos_override = case.get("eos_token_id_override")
    llm = LLM(model, max_batch_size=prompts.shape[0], noise=recorded_noise(noise), prompt_padding="right")
    params = [
        SamplingParams(
            max_tokens=max_length - padded_prompt,
            seed=row,
            keep_eos_chunk=True,
            stop_token_ids=() if eos_override is None else (eos_override,),
        )
        for row in range(prompts.shape[0])
    ]
    outputs = llm.generate([p.tolist() for p in prompts], params)
    for row, output in enumerate(outputs):
        ids = [t for t in output.prompt_token_ids if t != pad] + output.token_ids
        assert ids + [pad] * (max_length - len(ids)) == expected[row].tolist(), f"row {row}"


def test_temperature_sampling_candidates(fixture, model):
    """Counts and weights of the candidates on the recorded pools, in the official listing order."""
    case = require(fixture, "temperature_sampling_t05")
    if "rows" not in case:
        pytest.skip(f"fixture {fixture.root} records no candidates for temperature_sampling_t05")
    rows = ast.literal_eval(case["rows"]) if isinstance(case["rows"], str) else case["rows"]
    pools = fixture.output("temperature_sampling_t05", "pool_ids")
    for row, spec in enumerate(rows):
        valid = torch.ones(pools.shape[1], dtype=torch.bool)
        got = candidate_weights(pools[row], valid, 2.0)
        total = sum(w for _, _, w in spec["candidates"])
        assert [list(x) for x, _, _ in got] == [c[0] for c in spec["candidates"]]
        assert [c for _, c, _ in got] == [c[1] for c in spec["candidates"]]
        for (_, _, probability), (_, _, weight) in zip(got, spec["candidates"], strict=True):
            assert probability == pytest.approx(weight / total, rel=1e-9)


def engine_distribution(model, hidden: torch.Tensor, temperature: float, draws: int, samples: int) -> dict:
    """Output patches of the engine's sampling step for one hidden state repeated over `draws` rows."""
    llm = LLM(model, max_batch_size=1, max_model_len=model.config.patch_size)
    step = llm.engine.backends.torch
    params = SamplingParams(temperature=temperature, num_samples=samples)
    batch = SamplingBatch(
        seeds=torch.arange(draws) + 1000,
        steps=torch.zeros(draws, dtype=torch.long),
        valid=torch.ones(draws, params.samples_per_step, dtype=torch.bool),
        inv_floor=torch.full((draws,), params.inverse_floor),
        inv_frac=torch.zeros(draws, dtype=torch.float64),
        pools=torch.zeros(draws, dtype=torch.long),
        max_pools=0,
    )
    patches = step.sample(hidden.expand(draws, -1), batch).chunks
    counts: dict = {}
    for patch in patches.tolist():
        counts[tuple(patch)] = counts.get(tuple(patch), 0) + 1
    return {x: c / draws for x, c in counts.items()}


def official_distribution(stats: dict) -> tuple[dict, int]:
    counts = {tuple(patch): count for patch, count in stats["counts"]}
    total = sum(counts.values())
    return {x: c / total for x, c in counts.items()}, total


@pytest.mark.parametrize("temperature, draws", [(1.0, 20000), (0.5, 1000)])
def test_sampler_statistics(fixture, temperature, draws):
    path = fixture.root / "sampler_stats.json"
    if not path.is_file():
        pytest.skip(f"fixture {fixture.root} has no sampler_stats.json")
    stats = json.loads(path.read_text())
    model = _calm("safetensors")  # one format is enough here; the formats' equality is checked elsewhere
    hidden = fixture.tensors["sampler_stats.hidden"].reshape(1, -1)
    official, official_draws = official_distribution(stats["t1" if temperature == 1 else "t05"])
    ours = engine_distribution(model, hidden, temperature, draws, stats.get("t05", {}).get("num_samples", 200))
    bound = tv_threshold(official, official_draws, draws)
    distance = total_variation(ours, official)
    print(f"  T={temperature}: TV {distance:.4f}, bound {bound:.4f} ({official_draws} official, {draws} ours)")
    assert distance < bound
    if temperature < 1:  # the negative controls would fail this test
        t1, _ = official_distribution(stats["t1"])
        uniform, _ = official_distribution(stats["negative_control_t05_uniform_choice"])
        assert total_variation(ours, t1) > bound and total_variation(ours, uniform) > bound

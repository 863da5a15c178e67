"""The optional C++ helpers (csrc/) against the tensor-op references, and the engine without them."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.philox import uniform_noise_ref

from calm_engine import LLM, SamplingParams, native
from calm_engine.engine import sampler
from tests.model_factory import context_sensitive_model

needs_csrc = pytest.mark.skipif(native.calm_cpu is None, reason="calm_engine._calm_cpu is not built")


@needs_csrc
@pytest.mark.parametrize("rows, samples, dim", [(1, 1, 1), (3, 7, 13), (2, 200, 64), (5, 3, 1031)])
def test_philox_is_bit_identical_to_the_reference(rows, samples, dim):
    seeds = torch.randint(-(2**63), 2**63 - 1, (rows,))
    seeds[0] = 2**32 + 5  # a seed whose high word matters
    counters = torch.randint(0, 2**40, (rows,))
    fast = torch.from_numpy(native.calm_cpu.philox_uniform(seeds.numpy(), counters.numpy(), samples, dim))
    assert torch.equal(fast, uniform_noise_ref(seeds, counters, samples, dim))


@needs_csrc
def test_philox_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        native.calm_cpu.philox_uniform(
            torch.zeros(2, dtype=torch.long).numpy(), torch.zeros(3, dtype=torch.long).numpy(), 1, 1
        )


def test_engine_falls_back_to_tensor_ops(monkeypatch):
    model = context_sensitive_model(seed=3)
    prompts, params = [[4, 5, 6, 7]], SamplingParams(max_tokens=8, seed=9, temperature=0.5, num_samples=16)
    with_csrc = LLM(model, max_batch_size=1, max_model_len=32).generate(prompts, params)
    monkeypatch.setattr(native, "calm_cpu", None)  # the one import of the extension: nothing uses it now
    without = LLM(model, max_batch_size=1, max_model_len=32).generate(prompts, params)
    assert with_csrc[0].token_ids == without[0].token_ids


@needs_csrc
@pytest.mark.parametrize("inverse_temperature, k", [(2.0, 2), (1 / 0.7, 3), (3.0, 1), (1.0, 4)])
def test_exact_sampler_loop_equals_the_tensor_reference(inverse_temperature, k):
    """Several pools with the state carried over, some draws invalid, some rows done early: identical states."""
    rows, samples = 64, 37
    n = int(inverse_temperature + 1e-9)
    inv_floor = torch.full((rows,), n)
    inv_frac = torch.full((rows,), inverse_temperature - n, dtype=torch.float64)
    fast = slow = sampler.ExactState.start(rows, k, "cpu")
    undecided = []
    for _ in range(4):
        patches = torch.randint(0, 3, (rows, samples, k))
        valid = torch.rand(rows, samples) < 0.9
        uniforms = torch.rand(rows, samples)
        fast = sampler.exact_choice(fast, patches, valid, inv_floor, inv_frac, uniforms)
        slow = sampler.exact_choice_ref(slow, patches, valid, inv_floor, inv_frac, uniforms)
        for name in ("done", "chosen", "target", "matches", "in_stage2", "stage2_index"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
        undecided.append(int((~fast.done).sum()))
    assert fast.done.any() and (undecided[0] > 0 or n == 1)  # rows both accept and carry state into later pools

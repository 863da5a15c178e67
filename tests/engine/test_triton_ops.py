"""The PyTorch step with the Triton kernels (TritonOps, the CUDA path) against plain PyTorch (TorchOps), under the
triton interpreter.

The root conftest sets TRITON_INTERPRET=1 where no GPU is present, so this runs the real kernels on CPU in fp32.
"""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels import triton_available

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import counter
from calm_engine.engine.sampler import SamplingBatch
from tests.conftest import assert_rel_close
from tests.engine.steps import torch_step
from tests.model_factory import context_sensitive_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def steps(seed: int):
    def make(use_kernels: bool):
        model = context_sensitive_model(seed=seed, calm=dict(num_key_value_heads=2))
        cache = SlotKVCache(model.config, 4, 10, model.device, model.dtype)
        for i, tensor in enumerate(cache.keys + cache.values):
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i)))
        return torch_step(model, cache, use_kernels=use_kernels)

    return make(False), make(True)


def test_decode_step_with_kernels_matches_torch():
    reference, fast = steps(seed=2)
    ids = torch.randint(0, reference.weights.shapes.vocab, (3, reference.chunk_size))
    positions, slots = torch.tensor([2, 0, 9]), torch.tensor([3, 1, 0])
    expected = reference.decode_hidden(ids, positions, slots, attend=10)
    assert_rel_close(fast.decode_hidden(ids, positions, slots, attend=10), expected, 1e-4, "decode hidden")
    for got, want in zip(
        fast.cache.keys + fast.cache.values, reference.cache.keys + reference.cache.values, strict=True
    ):
        assert_rel_close(got, want, 1e-4, "cache")


@pytest.mark.parametrize("samples, temperature", [(1, 1.0), (6, 0.5)])
def test_sampling_with_kernels_matches_torch(samples, temperature):
    reference, fast = steps(seed=3)
    rows = 2
    hidden = torch.randn(rows, reference.weights.shapes.hidden)
    batch = SamplingBatch(
        torch.tensor([11, 2**35]), torch.tensor([0, 5]), torch.ones(rows, samples, dtype=torch.bool),
        torch.full((rows,), int(1 / temperature)), torch.zeros(rows, dtype=torch.float64),
        torch.zeros(rows, dtype=torch.long), 0,
    )  # fmt: skip
    seeds, counters = batch.seeds, counter(batch.steps)
    pool_ref = reference.sample_pool(hidden, seeds, counters, samples)
    assert torch.equal(fast.sample_pool(hidden, seeds, counters, samples), pool_ref)
    assert torch.equal(fast.sample(hidden, batch).chunks, reference.sample(hidden, batch).chunks)

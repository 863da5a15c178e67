"""The graph step's buffer logic on CPU (EagerCapture replays through the same static buffers).

The real capture is checked on a GPU by benchmarks/device_check.py (graph replay equals eager for every bucket).
"""

from __future__ import annotations

import pytest
import torch

from calm_engine import LLM, SamplingParams
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step.graph_step import EagerCapture, GraphStep, default_buckets
from tests.engine.steps import torch_step
from tests.model_factory import context_sensitive_model


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(6) == [1, 2, 4, 6]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(1000)[-1] == 64


def sampling_batch(rows: int, samples: int, temperature: float) -> SamplingBatch:
    return SamplingBatch(
        seeds=torch.arange(rows) * 7 + 3,
        steps=torch.arange(rows) % 3,
        valid=torch.ones(rows, samples, dtype=torch.bool),
        inv_floor=torch.full((rows,), int(1 / temperature)),
        inv_frac=torch.zeros(rows, dtype=torch.float64),
        pools=torch.zeros(rows, dtype=torch.long),
        max_pools=0,
    )


@pytest.mark.parametrize("rows, samples, temperature", [(1, 1, 1.0), (3, 1, 1.0), (5, 9, 0.5)])
def test_replay_equals_eager_and_padding_rows_stay_in_the_scratch_slot(rows, samples, temperature):
    model = context_sensitive_model(seed=4).double()
    cache = SlotKVCache(model.config, 8, 12, model.device, model.dtype)
    step = torch_step(model, cache)
    for tensor in cache.keys + cache.values:
        tensor.normal_()
    graphs = GraphStep(step, [1, 2, 4, 8], EagerCapture())
    ids = torch.randint(0, model.config.vocab_size, (rows, model.config.patch_size))
    positions = torch.tensor([4, 0, 7, 2, 9][:rows])
    slots = torch.tensor([6, 1, 3, 0, 7][:rows])
    batch = sampling_batch(rows, samples, temperature)
    before = [t.clone() for t in cache.keys + cache.values]
    hidden = step.decode_hidden(ids, positions, slots, attend=cache.capacity)
    expected = step.sample(hidden, batch).chunks
    eager_cache = [t.clone() for t in cache.keys + cache.values]
    for tensor, old in zip(cache.keys + cache.values, before, strict=True):
        tensor.copy_(old)
    result = graphs.run(ids, positions, slots, batch)
    assert graphs.bucket(rows) >= rows and result.chunks.shape == (rows, model.config.patch_size)
    assert torch.equal(result.chunks, expected) and not result.fell_back.any()
    live = list(range(8))  # every real slot; only the scratch slot (8) may differ from the eager run
    for tensor, eager, old in zip(cache.keys + cache.values, eager_cache, before, strict=True):
        # A padded batch rounds the projections differently in the last bits; a stray write would differ by O(1).
        torch.testing.assert_close(tensor[live], eager[live], rtol=1e-12, atol=1e-12)
        untouched = [s for s in live if s not in slots.tolist()]
        assert torch.equal(tensor[untouched], old[untouched])


def test_a_second_replay_reuses_the_graph_with_new_inputs():
    model = context_sensitive_model(seed=5).double()
    cache = SlotKVCache(model.config, 4, 10, model.device, model.dtype)
    graphs = GraphStep(torch_step(model, cache), [4], EagerCapture())
    ids = torch.randint(0, model.config.vocab_size, (3, model.config.patch_size))
    first = graphs.run(ids, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), sampling_batch(3, 1, 1.0)).chunks
    first = first.clone()
    second = graphs.run(ids[:2], torch.tensor([0, 0]), torch.tensor([0, 1]), sampling_batch(2, 1, 1.0)).chunks
    assert len(graphs.graphs) == 1 and torch.equal(second, first[:2])


def test_engine_with_graph_runner_matches_eager_engine():
    model = context_sensitive_model(seed=6).double()
    prompts = [[5, 6, 7], [1] * 9, [8, 9, 10, 11, 12]]
    params = [
        SamplingParams(max_tokens=12, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=10, seed=2, temperature=0.5, num_samples=12, ignore_eos=True),
        SamplingParams(max_tokens=9, seed=3, temperature=0.7, sampler="exact", num_samples=8, ignore_eos=True),
    ]
    eager = LLM(model, max_batch_size=3, max_model_len=40).generate(prompts, params)
    graphed_llm = LLM(model, max_batch_size=3, max_model_len=40, use_cuda_graph=True, cuda_graph_buckets=[2, 4])
    graphed = graphed_llm.generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert graphed_llm.engine.backends.graph.graphs, "the graph step was not used"

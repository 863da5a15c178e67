"""The C++ decode step (csrc/decode_step.cpp) against the ModelRunner's PyTorch path, on odd shapes."""

from __future__ import annotations

import pytest
import torch

from calm_engine import LLM, SamplingParams
from calm_engine.engine import cpu_step
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.model_runner import ModelRunner, SamplingBatch
from calm_engine.model.calm import CalmModel
from tests.engine.test_model_runner import SHAPES
from tests.model_factory import context_sensitive_model

pytestmark = pytest.mark.skipif(
    cpu_step.model_runner._calm_cpu is None or cpu_step.torch_blas_addresses() is None,
    reason="calm_engine._calm_cpu is not built or torch exports no sgemm_",
)


# The step with and without its AVX-512 kernels (packed products, vectorised SiLU and exp), where the CPU has them.
_calm_cpu = cpu_step.model_runner._calm_cpu
AVX512 = [False] + ([True] if _calm_cpu is not None and _calm_cpu.avx512_supported() else [])


def t1_batch(seeds: torch.Tensor, steps: torch.Tensor) -> SamplingBatch:
    """The SamplingBatch of rows at T = 1 (one head sample each), the only case the C++ step runs."""
    rows = len(seeds)
    return SamplingBatch(
        seeds, steps, torch.ones(rows, 1, dtype=torch.bool), torch.ones(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.long), 0,
    )  # fmt: skip


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_step_matches_the_torch_path(shape, avx512):
    model = context_sensitive_model(seed=len(shape) + 1, **SHAPES[shape])
    cache = SlotKVCache(model.config, 5, 12, model.device, model.dtype)
    runner = ModelRunner(model, cache)
    for tensor in cache.keys + cache.values:
        tensor.normal_()
    step = cpu_step.CpuDecodeStep(runner, avx512=avx512)
    rows = 4
    ids = torch.randint(0, model.config.vocab_size, (rows, model.config.patch_size))
    positions, slots = torch.tensor([3, 0, 11, 6]), torch.tensor([4, 0, 2, 5])  # slot 5: the scratch slot
    seeds, steps = torch.tensor([5, 2**40, 7, 9]), torch.tensor([0, 3, 8, 1])
    before = [t.clone() for t in cache.keys + cache.values]
    hidden = runner.decode(ids, positions, slots, attend=cache.capacity)
    expected, _ = runner.sample_patches(hidden, t1_batch(seeds, steps))
    torch_cache = [t.clone() for t in cache.keys + cache.values]
    for tensor, old in zip(cache.keys + cache.values, before, strict=True):
        tensor.copy_(old)
    assert torch.equal(step.run(ids, positions, slots, seeds, steps), expected)
    for tensor, reference in zip(cache.keys + cache.values, torch_cache, strict=True):
        torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("avx512", AVX512)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_prefill_matches_the_torch_path(shape, avx512):
    """Prompts of different lengths prefilled as one C++ call: the same first chunks as ModelRunner.prefill followed
    by sample_patches, and the same keys and values at every prompt position."""
    model = context_sensitive_model(seed=len(shape) + 21, **SHAPES[shape])
    cache = SlotKVCache(model.config, 4, 9, model.device, model.dtype)
    runner = ModelRunner(model, cache)
    step = cpu_step.CpuDecodeStep(runner, avx512=avx512)
    k, chunks, slots = model.config.patch_size, [5, 1, 9], [2, 0, 3]
    ids = torch.randint(0, model.config.vocab_size, (len(chunks), max(chunks) * k))
    seeds, steps = torch.tensor([11, 2**35, 4]), torch.tensor([0, 0, 2])
    hidden = runner.prefill(ids, torch.tensor(chunks), torch.tensor(slots))
    expected, _ = runner.sample_patches(hidden, t1_batch(seeds, steps))
    reference = [t.clone() for t in cache.keys + cache.values]
    for tensor in cache.keys + cache.values:
        tensor.fill_(float("nan"))  # poisoned: every position a prompt reads must be written by the C++ prefill
    prompts = [row[: n * k].tolist() for row, n in zip(ids, chunks, strict=True)]
    assert torch.equal(step.prefill(prompts, slots, seeds, steps), expected)
    for tensor, ref in zip(cache.keys + cache.values, reference, strict=True):
        for slot, n in zip(slots, chunks, strict=True):
            torch.testing.assert_close(tensor[slot, :, :n], ref[slot, :, :n], rtol=1e-5, atol=1e-5)


def test_cpu_step_rejects_out_of_range_inputs():
    model = context_sensitive_model(seed=1)
    runner = ModelRunner(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    step = cpu_step.CpuDecodeStep(runner)
    ids = torch.zeros(1, model.config.patch_size, dtype=torch.long)
    seeds, steps = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="out of range"):
        step.run(ids, torch.tensor([8]), torch.tensor([0]), seeds, steps)
    with pytest.raises(ValueError, match="id"):
        step.run(ids + model.config.vocab_size, torch.tensor([0]), torch.tensor([0]), seeds, steps)


@pytest.mark.parametrize("avx512", AVX512)
def test_engine_output_is_the_same_with_and_without_the_cpu_step(avx512):
    model = context_sensitive_model(seed=8)
    prompts = [[5, 6, 7], [1] * 9, [8, 9, 10, 11, 12]]
    params = SamplingParams(max_tokens=14, seed=4, ignore_eos=True)
    fast = LLM(model, max_batch_size=3, max_model_len=40, cpu_step_avx512=avx512)
    assert fast.engine.cpu_step is not None and fast.engine.cpu_step.avx512 == avx512
    slow = LLM(model, max_batch_size=3, max_model_len=40, use_cpu_step=False)
    assert [o.token_ids for o in fast.generate(prompts, params)] == [
        o.token_ids for o in slow.generate(prompts, params)
    ]


def _step_and_reference(model: CalmModel, rows: int = 6, screen_vocab: bool | None = None, avx512: bool | None = None):
    """The C++ step's output for `rows` one-chunk prompts, the PyTorch path's, and the step."""
    cache = SlotKVCache(model.config, rows, 8, model.device, model.dtype)
    runner = ModelRunner(model, cache)
    ids = torch.randint(0, model.config.vocab_size, (rows, model.config.patch_size))
    positions, slots = torch.zeros(rows, dtype=torch.long), torch.arange(rows)
    seeds, steps = torch.arange(rows) + 11, torch.zeros(rows, dtype=torch.long)
    hidden = runner.decode(ids, positions, slots, attend=cache.capacity)
    expected, _ = runner.sample_patches(hidden, t1_batch(seeds, steps))
    for tensor in cache.keys + cache.values:
        tensor.zero_()
    step = cpu_step.CpuDecodeStep(runner, screen_vocab=screen_vocab, avx512=avx512)
    return step.run(ids, positions, slots, seeds, steps), expected, step


SCREEN = [False, pytest.param(True, marks=pytest.mark.skipif(
    cpu_step.torch_blas_addresses() is None or cpu_step.torch_blas_addresses().gemm_bf16 is None,
    reason="torch's MKL has no bfloat16 GEMM",
))]  # fmt: skip


@pytest.mark.parametrize("screen_vocab", SCREEN)
@pytest.mark.parametrize("vocab_size", [1024, 2999])  # the vocabulary split in halves and 512-column tiles
@pytest.mark.parametrize("rows", [1, 8])  # with AVX512-BF16: the packed screen at K rows, MKL's GEMM at 8 K
def test_cpu_step_argmax_over_a_large_vocabulary(vocab_size, screen_vocab, rows):
    torch.manual_seed(vocab_size)
    model = context_sensitive_model(seed=3, vocab_size=vocab_size)
    got, expected, step = _step_and_reference(model, rows=rows, screen_vocab=screen_vocab)
    assert torch.equal(got, expected)
    assert step.screen_vocab == screen_vocab
    assert step.screen_fallback_rows == 0  # with the screen: every row settled by it


@torch.no_grad()
def test_cpu_step_argmax_ties_go_to_the_first_id():
    """Every vocabulary row equal: every logit ties, across tiles and across the two threads' halves."""
    model = context_sensitive_model(seed=4, vocab_size=2999)
    embedding = model.autoencoder.encoder.embed_tokens.weight
    embedding.copy_(embedding[:1].expand_as(embedding))
    got, expected, step = _step_and_reference(model)
    assert torch.equal(expected, torch.zeros_like(expected))
    assert torch.equal(got, expected)
    if step.screen_vocab:  # every row ties on all ids: the screen hands them all to the float32 projection
        assert step.screen_fallback_rows == expected.numel()


@pytest.mark.parametrize("avx512", AVX512)
def test_cpu_step_on_one_thread(avx512):
    """No worker thread: every product whole, the vocabulary in one range of tiles."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = context_sensitive_model(seed=5, vocab_size=1500)
        got, expected, _ = _step_and_reference(model, avx512=avx512)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_cpu_step_does_not_screen_a_projection_it_cannot_bound():
    model = context_sensitive_model(seed=6, vocab_size=1100)
    model.autoencoder.encoder.embed_tokens.weight[17, 3] = 1e31  # the tied projection: one row beyond the bound
    runner = ModelRunner(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    assert not cpu_step.CpuDecodeStep(runner).screen_vocab
    with pytest.raises(RuntimeError, match="screen"):
        cpu_step.CpuDecodeStep(runner, screen_vocab=True)

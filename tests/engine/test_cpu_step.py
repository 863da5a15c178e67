"""The C++ decode step (csrc/decode_step.cpp) against the PyTorch step, on odd shapes, at every
instruction-set level this CPU runs (an AVX-512 machine thereby runs the AVX2 and generic paths too)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from calm_engine.kernels import ae_decode

from calm_engine import LLM, SamplingParams, native
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step import native_step as cpu_step
from calm_engine.engine.step.torch_step import TorchStep
from calm_engine.model.calm import CalmModel
from tests.engine.steps import native_step, torch_step
from tests.engine.test_torch_step import SHAPES
from tests.model_factory import context_sensitive_model

pytestmark = pytest.mark.skipif(
    native.calm_cpu is None or cpu_step.torch_blas_addresses() is None,
    reason="calm_engine._calm_cpu is not built or torch exports no sgemm_",
)

SUPPORTED = cpu_step.supported_isas()
ISA = [
    pytest.param(level, marks=pytest.mark.skipif(level not in SUPPORTED, reason=f"this CPU does not run {level}"))
    for level in cpu_step.ISA_LEVELS
]


def t1_batch(seeds: torch.Tensor, steps: torch.Tensor) -> SamplingBatch:
    """The SamplingBatch of rows at T = 1 (one head sample each), the only case the C++ step runs."""
    rows = len(seeds)
    return SamplingBatch(
        seeds, steps, torch.ones(rows, 1, dtype=torch.bool), torch.ones(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.long), 0,
    )  # fmt: skip


def t1_reference(runner: TorchStep, hidden: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor):
    """The PyTorch path's chunks [B, K] at T = 1 and, for judging near-ties, the float64 logits [B, K, vocab] of its
    final decoder states, with a bound [B, K] on how far float32 rounding can move them."""
    captured = []
    project = ae_decode.project_argmax_ref

    def capture(x, weight):
        captured.append((x.double(), weight.double()))
        return project(x, weight)

    with mock.patch.object(ae_decode, "project_argmax_ref", capture):
        ids = runner.sample(hidden, t1_batch(seeds, steps)).chunks
    (x, weight), = captured  # fmt: skip
    logits = (x @ weight.T).view(*ids.shape, -1)
    # Float32 rounding between two implementations of the step: each of its chained products (backbone, head,
    # decoder; ~20 in these models, each of at most `width` terms) moves its result by up to width * 2^-24 of its
    # magnitude; the normalisations keep the magnitudes at O(1). The logits then move by at most that relative error
    # times |x| max|w| (Cauchy-Schwarz).
    mlps = [layer.mlp.down for layer in runner.weights.backbone.layers + runner.weights.decoder.layers]
    width = max(runner.weights.shapes.hidden, *(down.in_features for down in mlps))
    rel = 20 * width * 2**-24
    slack = rel * x.norm(dim=-1).view(ids.shape) * weight.norm(dim=-1).max()
    return ids, logits, slack


def assert_same_argmax(got: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor, slack: torch.Tensor):
    """got == expected wherever the float64 logits' best id leads every other by more than float32 rounding can
    move them; where it does not, got (and expected) must be among the ids within that margin of the best."""
    near = logits >= (logits.max(-1).values - slack)[..., None]
    assert near.gather(-1, expected[..., None]).all(), "the reference's own id is outside the rounding margin"
    assert near.gather(-1, got[..., None]).all(), f"ids {got.tolist()} != {expected.tolist()} beyond the margin"
    assert (near.sum(-1) == 1).float().mean() >= 0.5, "too few ids decided by margin for the test to mean much"


@pytest.mark.parametrize("isa", ISA)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_step_matches_the_torch_path(shape, isa):
    model = context_sensitive_model(seed=len(shape) + 1, **SHAPES[shape])
    cache = SlotKVCache(model.config, 5, 12, model.device, model.dtype)
    runner = torch_step(model, cache)
    for tensor in cache.keys + cache.values:
        tensor.normal_()
    step = native_step(runner, isa=isa)
    assert step.isa == isa
    rows = 4
    ids = torch.randint(0, model.config.vocab_size, (rows, model.config.chunk_size))
    positions, slots = torch.tensor([3, 0, 11, 6]), torch.tensor([4, 0, 2, 5])  # slot 5: the scratch slot
    seeds, steps = torch.tensor([5, 2**40, 7, 9]), torch.tensor([0, 3, 8, 1])
    before = [t.clone() for t in cache.keys + cache.values]
    hidden = runner.decode_hidden(ids, positions, slots, attend=cache.capacity)
    expected, logits, slack = t1_reference(runner, hidden, seeds, steps)
    torch_cache = [t.clone() for t in cache.keys + cache.values]
    for tensor, old in zip(cache.keys + cache.values, before, strict=True):
        tensor.copy_(old)
    assert_same_argmax(step.run(ids, positions, slots, seeds, steps), expected, logits, slack)
    for tensor, reference in zip(cache.keys + cache.values, torch_cache, strict=True):
        torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISA)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_prefill_matches_the_torch_path(shape, isa):
    """Prompts of different lengths prefilled as one C++ call: the same first chunks as TorchStep.prefill_hidden
    followed by sample, and the same keys and values at every prompt position."""
    model = context_sensitive_model(seed=len(shape) + 21, **SHAPES[shape])
    cache = SlotKVCache(model.config, 4, 9, model.device, model.dtype)
    runner = torch_step(model, cache)
    step = native_step(runner, isa=isa)
    k, chunks, slots = model.config.chunk_size, [5, 1, 9], [2, 0, 3]
    ids = torch.randint(0, model.config.vocab_size, (len(chunks), max(chunks) * k))
    seeds, steps = torch.tensor([11, 2**35, 4]), torch.tensor([0, 0, 2])
    hidden = runner.prefill_hidden(ids, torch.tensor(chunks), torch.tensor(slots))
    expected, logits, slack = t1_reference(runner, hidden, seeds, steps)
    reference = [t.clone() for t in cache.keys + cache.values]
    for tensor in cache.keys + cache.values:
        tensor.fill_(float("nan"))  # poisoned: every position a prompt reads must be written by the C++ prefill
    prompts = [row[: n * k].tolist() for row, n in zip(ids, chunks, strict=True)]
    assert_same_argmax(step.prefill_prompts(prompts, slots, seeds, steps), expected, logits, slack)
    for tensor, ref in zip(cache.keys + cache.values, reference, strict=True):
        for slot, n in zip(slots, chunks, strict=True):
            torch.testing.assert_close(tensor[slot, :, :n], ref[slot, :, :n], rtol=1e-5, atol=1e-5)


def test_cpu_step_rejects_out_of_range_inputs():
    model = context_sensitive_model(seed=1)
    runner = torch_step(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    step = native_step(runner)
    ids = torch.zeros(1, model.config.chunk_size, dtype=torch.long)
    seeds, steps = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="out of range"):
        step.run(ids, torch.tensor([8]), torch.tensor([0]), seeds, steps)
    with pytest.raises(ValueError, match="id"):
        step.run(ids + model.config.vocab_size, torch.tensor([0]), torch.tensor([0]), seeds, steps)


@pytest.mark.parametrize("isa", ISA)
def test_engine_output_is_the_same_with_and_without_the_cpu_step(isa):
    """Whole generations, so an id decided differently would change every later one: this model and seed have no
    near-tie within float32 rounding at any step (test_cpu_step_matches_the_torch_path checks single steps where
    near-ties may occur)."""
    model = context_sensitive_model(seed=8)
    prompts = [[5, 6, 7], [1] * 9, [8, 9, 10, 11, 12]]
    params = SamplingParams(max_tokens=14, seed=4, ignore_eos=True)
    fast = LLM(model, max_batch_size=3, max_model_len=40, cpu_isa=isa)
    assert fast.engine.backends.native is not None and fast.engine.backends.native.isa == isa
    slow = LLM(model, max_batch_size=3, max_model_len=40, use_cpu_step=False)
    assert [o.token_ids for o in fast.generate(prompts, params)] == [
        o.token_ids for o in slow.generate(prompts, params)
    ]


def _step_and_reference(model: CalmModel, rows: int = 6, screen_vocab: bool | None = None, isa: str | None = None):
    """The C++ step's output for `rows` one-chunk prompts, the PyTorch path's (ids, float64 logits, their rounding
    slack; see t1_reference), and the step."""
    cache = SlotKVCache(model.config, rows, 8, model.device, model.dtype)
    runner = torch_step(model, cache)
    ids = torch.randint(0, model.config.vocab_size, (rows, model.config.chunk_size))
    positions, slots = torch.zeros(rows, dtype=torch.long), torch.arange(rows)
    seeds, steps = torch.arange(rows) + 11, torch.zeros(rows, dtype=torch.long)
    hidden = runner.decode_hidden(ids, positions, slots, attend=cache.capacity)
    reference = t1_reference(runner, hidden, seeds, steps)
    for tensor in cache.keys + cache.values:
        tensor.zero_()
    step = native_step(runner, screen_vocab=screen_vocab, isa=isa)
    return step.run(ids, positions, slots, seeds, steps), reference, step


HAS_GEMM = cpu_step.torch_blas_addresses() is not None and cpu_step.torch_blas_addresses().gemm_bf16 is not None


@pytest.mark.parametrize("isa", ISA)
@pytest.mark.parametrize("screen_vocab", [False, True])
@pytest.mark.parametrize("vocab_size", [1024, 2999])  # the vocabulary split in halves and 512-column tiles
@pytest.mark.parametrize("rows", [1, 8])  # the packed screen at K rows; above 8 rows MKL's GEMM where it exists
def test_cpu_step_argmax_over_a_large_vocabulary(vocab_size, screen_vocab, rows, isa):
    if screen_vocab and isa == "generic" and not HAS_GEMM:
        pytest.skip("the generic level screens with MKL's bfloat16 GEMM, which this torch lacks")
    torch.manual_seed(vocab_size)
    model = context_sensitive_model(seed=3, vocab_size=vocab_size)
    got, reference, step = _step_and_reference(model, rows=rows, screen_vocab=screen_vocab, isa=isa)
    assert_same_argmax(got, *reference)
    assert step.screen_vocab == screen_vocab
    assert step.screen_fallback_rows == 0  # with the screen: every row settled by it


@torch.no_grad()
@pytest.mark.parametrize("isa", ISA)
def test_cpu_step_argmax_ties_go_to_the_first_id(isa):
    """Every vocabulary row the same one-hot vector: every logit is the same single product, bit-equal in any
    summation order (the other terms are zeros), so every logit ties exactly on every path, across tiles and the two
    threads' halves."""
    model = context_sensitive_model(seed=4, vocab_size=2999)
    embedding = model.autoencoder.encoder.embed_tokens.weight  # tied to the vocabulary projection
    embedding.zero_()
    embedding[:, 3] = 1.0
    got, (expected, _, _), step = _step_and_reference(model, isa=isa)
    assert torch.equal(expected, torch.zeros_like(expected))
    assert torch.equal(got, expected)
    if step.screen_vocab:  # every row ties on all ids: the screen hands them all to the float32 projection
        assert step.screen_fallback_rows == expected.numel()


@pytest.mark.parametrize("isa", ISA)
def test_cpu_step_projects_only_the_rows_the_screen_leaves_open(isa):
    """700 equal vocabulary rows (more candidates than a screen keeps), scaled up so that some decoded rows have them
    as their best ids: those rows alone go to the float32 projection, the first of the equal ids winning."""
    model = context_sensitive_model(seed=4, vocab_size=2999)
    embedding = model.autoencoder.encoder.embed_tokens.weight  # tied to the vocabulary projection
    embedding[100:800] = 6 * embedding[100]
    got, reference, step = _step_and_reference(model, isa=isa)
    assert_same_argmax(got, *reference)
    tied = (reference[0] >= 100) & (reference[0] < 800)
    assert 0 < tied.sum() < tied.numel()
    assert torch.equal(got[tied], torch.full_like(got[tied], 100))
    if step.screen_vocab:  # and rows where the equal ids come close enough to stay candidates
        assert tied.sum() <= step.screen_fallback_rows < tied.numel()


@pytest.mark.parametrize("isa", ISA)
def test_cpu_step_on_one_thread(isa):
    """No worker thread: every product whole, the vocabulary in one range of tiles."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = context_sensitive_model(seed=5, vocab_size=1500)
        got, reference, _ = _step_and_reference(model, isa=isa)
    finally:
        torch.set_num_threads(threads)
    assert_same_argmax(got, *reference)


@pytest.mark.parametrize("isa", ISA)
def test_the_screen_is_on_by_default_where_the_level_says(isa):
    model = context_sensitive_model(seed=7, vocab_size=700)
    runner = torch_step(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    step = native_step(runner, isa=isa)
    assert step.screen_vocab == cpu_step.SCREEN_BY_DEFAULT[isa]


def test_the_level_comes_from_the_argument_then_the_environment_then_the_cpu(monkeypatch):
    monkeypatch.delenv(cpu_step.ISA_ENV, raising=False)
    assert cpu_step.resolve_isa() == SUPPORTED[-1]
    assert cpu_step.resolve_isa("generic") == "generic"
    monkeypatch.setenv(cpu_step.ISA_ENV, "generic")
    assert cpu_step.resolve_isa() == "generic"
    assert cpu_step.resolve_isa(SUPPORTED[-1]) == SUPPORTED[-1]
    model = context_sensitive_model(seed=9)
    assert LLM(model, max_batch_size=2, max_model_len=16).engine.backends.native.isa == "generic"
    monkeypatch.setenv(cpu_step.ISA_ENV, "avx9")
    with pytest.raises(ValueError, match=r"\$CALM_CPU_ISA='avx9' is not an instruction-set level.*generic, avx2"):
        LLM(model, max_batch_size=2, max_model_len=16)


def test_unknown_or_unsupported_levels_are_clear_errors(monkeypatch):
    model = context_sensitive_model(seed=9)
    with pytest.raises(ValueError, match=r"cpu_isa='AVX2' is not.*avx512_bf16, amx \(this CPU runs generic"):
        LLM(model, max_batch_size=2, max_model_len=16, cpu_isa="AVX2")
    # a CPU with AVX2 only, as far as the step can tell
    monkeypatch.setattr(cpu_step, "supported_isas", lambda: ("generic", "avx2"))
    monkeypatch.delenv(cpu_step.ISA_ENV, raising=False)
    with pytest.raises(ValueError, match=r"cpu_isa='amx': this CPU does not run that level; it runs generic, avx2"):
        LLM(model, max_batch_size=2, max_model_len=16, cpu_isa="amx")
    assert cpu_step.resolve_isa() == "avx2"


@torch.no_grad()
def test_cpu_step_does_not_screen_a_projection_it_cannot_bound():
    model = context_sensitive_model(seed=6, vocab_size=1100)
    model.autoencoder.encoder.embed_tokens.weight[17, 3] = 1e31  # the tied projection: one row beyond the bound
    runner = torch_step(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    assert not native_step(runner).screen_vocab
    with pytest.raises(RuntimeError, match="screen"):
        native_step(runner, screen_vocab=True)

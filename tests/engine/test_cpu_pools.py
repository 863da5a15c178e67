"""Temperature sampling through the C++ step (csrc/sample_pool.cpp): its pools of head samples against the PyTorch
step's, at every instruction-set level this CPU runs, and whole seeded generations at T < 1 with either backend."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from calm_engine.kernels import ae_decode

from calm_engine import LLM, SamplingParams, native
from calm_engine.engine.config import EngineConfig
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import counter
from calm_engine.engine.step import native_step as cpu_step
from calm_engine.engine.step.interface import Phase
from calm_engine.engine.step.policy import choose_backend
from tests.engine.steps import native_step, torch_step
from tests.engine.test_cpu_step import ISA, assert_same_argmax
from tests.engine.test_torch_step import SHAPES
from tests.model_factory import context_sensitive_model

pytestmark = pytest.mark.skipif(
    native.calm_cpu is None or cpu_step.torch_blas_addresses() is None,
    reason="calm_engine._calm_cpu is not built or torch exports no sgemm_",
)


def pool_reference(runner, hidden: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, samples: int):
    """The PyTorch step's pool [B, S, K] and, for judging near-ties, the float64 logits [B, S, K, vocab] of its final
    decoder states with a bound [B, S, K] on how far float32 rounding can move them (as test_cpu_step.t1_reference)."""
    captured = []
    project = ae_decode.project_argmax_ref

    def capture(x, weight):
        captured.append((x.double(), weight.double()))
        return project(x, weight)

    with mock.patch.object(ae_decode, "project_argmax_ref", capture):
        ids = runner.sample_pool(hidden, seeds, counters, samples)
    (x, weight), = captured  # fmt: skip
    logits = (x @ weight.T).view(*ids.shape, -1)
    mlps = [layer.mlp.down for layer in runner.weights.backbone.layers + runner.weights.decoder.layers]
    width = max(runner.weights.shapes.hidden, *(down.in_features for down in mlps))
    slack = 20 * width * 2**-24 * x.norm(dim=-1).view(ids.shape) * weight.norm(dim=-1).max()
    return ids, logits, slack


@pytest.mark.parametrize("isa", ISA)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_pool_matches_the_torch_path(shape, isa):
    """37 samples of 3 rows: 111 latents, decoded by the C++ step in blocks of 64, each through the screen where the
    level has it on. The hidden-state half of the head runs once per row there, per sample in PyTorch."""
    model = context_sensitive_model(seed=len(shape) + 31, vocab_size=1500, **SHAPES[shape])
    runner = torch_step(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    step = native_step(runner, isa=isa)
    generator = torch.Generator().manual_seed(len(shape))
    hidden = torch.randn(3, model.config.hidden_size, generator=generator)
    seeds, counters = torch.tensor([5, 2**40, 7]), counter(torch.tensor([0, 3, 1]), pool=2)
    expected, logits, slack = pool_reference(runner, hidden, seeds, counters, 37)
    got = step.sample_pool(hidden.numpy(), seeds.numpy(), counters.numpy(), 37)
    assert got.shape == expected.shape
    assert_same_argmax(got, expected, logits, slack)
    stats = step.pool_stats
    assert stats["rows"] == expected.numel()
    assert stats["fallback_rows"] == 0
    if step.screen_vocab and isa != "avx512":  # every row keeps at least its own argmax as a candidate
        most = 8 if isa == "avx2" else 4  # avx2: the int8 screen, with 7-bit rows
        assert expected.numel() <= stats["candidates"] <= most * expected.numel()
    else:  # no screen, or the widened one, which pools skip for the dense projection (VocabArgmax::pool_argmax)
        assert stats["candidates"] == 0


def test_cpu_pool_rejects_bad_shapes():
    model = context_sensitive_model(seed=2)
    runner = torch_step(model, SlotKVCache(model.config, 2, 8, model.device, model.dtype))
    step = native_step(runner)
    hidden = np.zeros((2, model.config.hidden_size), dtype=np.float32)
    with pytest.raises(ValueError, match=r"hidden \[B, hidden\] and noise \[B, N, noise\]"):
        step._step.sample_pool(hidden, np.zeros((3, 4, model.config.noise_size), dtype=np.float32))
    with pytest.raises(ValueError, match=r"noise \[B, N, noise\]"):
        step._step.sample_pool(hidden, np.zeros((2, 4, model.config.noise_size + 1), dtype=np.float32))


PARAMS = {
    "approximate T=0.5": SamplingParams(max_tokens=12, seed=4, temperature=0.5, num_samples=150, ignore_eos=True),
    "approximate T=0.7": SamplingParams(max_tokens=12, seed=9, temperature=0.7, num_samples=40, ignore_eos=True),
    "exact T=0.5": SamplingParams(
        max_tokens=12, seed=5, temperature=0.5, num_samples=30, sampler="exact", exact_max_pools=4, ignore_eos=True
    ),
}


@pytest.mark.parametrize("isa", ISA)
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_engine_output_at_temperature_is_the_same_with_and_without_the_cpu_step(name, isa):
    """Whole seeded generations at T < 1 (prefill and decode steps, one row at T = 1 beside them): the same ids from
    the C++ step's pools as from the PyTorch step's, as this model and these seeds have no near-tie within float32
    rounding among their samples (test_cpu_pool_matches_the_torch_path checks pools where near-ties may occur)."""
    model = context_sensitive_model(seed=8)
    prompts = [[5, 6, 7], [1] * 9, [8, 9, 10, 11, 12]]
    params = [PARAMS[name], PARAMS[name], SamplingParams(max_tokens=12, seed=2, ignore_eos=True)]
    fast = LLM(model, max_batch_size=3, max_model_len=40, cpu_isa=isa, step_backend="native")
    slow = LLM(model, max_batch_size=3, max_model_len=40, use_cpu_step=False)
    got = [o.token_ids for o in fast.generate(prompts, params)]
    assert got == [o.token_ids for o in slow.generate(prompts, params)]
    assert len({tuple(ids) for ids in got[:2]}) == 2  # the prompts lead to different samples


def test_the_policy_runs_pools_on_the_cpu_step_within_its_limit():
    model = context_sensitive_model(seed=3)
    llm = LLM(model, max_batch_size=4, max_model_len=16)
    backends = llm.engine.backends
    rows = [SimpleNamespace(params=SamplingParams(temperature=0.5, num_samples=200), prompt_chunks=1)] * 4
    assert choose_backend(Phase.DECODE, rows, backends, llm.engine.engine_config) is backends.native
    assert choose_backend(Phase.PREFILL, rows, backends, llm.engine.engine_config) is backends.native
    tight = EngineConfig(cpu_pool_max_draws=799)
    assert choose_backend(Phase.DECODE, rows, backends, tight) is backends.torch
    with pytest.raises(ValueError, match="cpu_pool_max_draws"):
        EngineConfig(cpu_pool_max_draws=-1)

"""The reference model's behaviour on random models of odd shapes: caching, causality, GQA, input validation."""

from __future__ import annotations

import math

import pytest
import torch

from calm_engine.model.llama import apply_rotary, rope_inverse_frequencies, rotary_cos_sin
from tests.conftest import assert_rel_close
from tests.model_factory import random_calm_model

SHAPES = [
    dict(patch_size=4, calm={}),
    dict(patch_size=2, calm={"num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 5e5}),
    dict(
        patch_size=3,
        calm={
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_size": 20,
            "rope_scaling": {"type": "linear", "factor": 3.0},
        },
    ),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["mha-k4", "gqa-k2", "mqa-k3-linear-rope"])
def test_incremental_decode_equals_prefill(shape):
    """Any split of a sequence into cached calls gives the hidden states of one uncached call."""
    model = random_calm_model(seed=11, patch_size=shape["patch_size"], calm=shape["calm"])
    k = model.config.chunk_size
    ids = torch.randint(0, model.config.vocab_size, (3, 7 * k))
    full = model.hidden_states(ids)
    for splits in ([7], [1] * 7, [3, 1, 2, 1], [5, 2]):
        cache = model.new_cache(3, capacity=9)
        parts, start = [], 0
        for size in splits:
            parts.append(model.hidden_states(ids[:, start * k : (start + size) * k], cache))
            start += size
        assert cache.length == 7
        assert_rel_close(torch.cat(parts, dim=1), full, 1e-5, f"splits {splits}")


def naive_attention_backbone(model, ids):
    """The backbone written out with an explicit softmax and per-head loops: an independent check of SDPA + GQA."""
    config, backbone = model.config, model.backbone
    x = model.compress(ids)
    batch, steps, _ = x.shape
    positions = torch.arange(steps).expand(batch, steps)
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling, x.dtype)
    group = config.num_attention_heads // config.num_key_value_heads
    for layer in backbone.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = apply_rotary(attn.q_proj(h).view(batch, steps, -1, config.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(attn.k_proj(h).view(batch, steps, -1, config.head_dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(h).view(batch, steps, -1, config.head_dim).transpose(1, 2)
        heads = []
        for head in range(config.num_attention_heads):
            scores = q[:, head] @ k[:, head // group].transpose(-1, -2) / math.sqrt(config.head_dim)
            scores = scores.masked_fill(torch.ones(steps, steps, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, head // group])
        x = x + attn.o_proj(torch.stack(heads, dim=2).reshape(batch, steps, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.norm(x)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha-k4", "gqa-k2", "mqa-k3-linear-rope"])
def test_backbone_matches_naive_attention(shape):
    model = random_calm_model(seed=12, patch_size=shape["patch_size"], calm=shape["calm"])
    ids = torch.randint(0, model.config.vocab_size, (2, 5 * model.config.chunk_size))
    assert_rel_close(model.hidden_states(ids), naive_attention_backbone(model, ids), 1e-5)


def test_rotary_rotates_pairs_half_apart():
    """Position p rotates the pair (x_i, x_{i+D/2}) by p * theta^(-2i/D) / factor."""
    cos, sin = rotary_cos_sin(
        torch.tensor([[3]]),
        head_dim=8,
        theta=100.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        dtype=torch.float64,
    )
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    out = apply_rotary(x, cos, sin)[0, 0, 0]
    for i in range(4):
        angle = 3 * 100.0 ** (-2 * i / 8) / 2.0
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + 4]
        expected = torch.stack([a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)])
        assert torch.allclose(out[[i, i + 4]], expected, rtol=1e-6, atol=1e-6)


def test_causality():
    """Changing a later chunk never changes the hidden states of earlier chunks."""
    model = random_calm_model(seed=13)
    k = model.config.chunk_size
    ids = torch.randint(0, model.config.vocab_size, (1, 6 * k))
    changed = ids.clone()
    changed[:, 4 * k :] = (changed[:, 4 * k :] + 1) % model.config.vocab_size
    a, b = model.hidden_states(ids), model.hidden_states(changed)
    assert torch.equal(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_head_and_autoencoder_rows_are_independent():
    """A row's result does not depend on the other rows of the batch (up to float32 summation order)."""
    model = random_calm_model(seed=14)
    hidden = torch.randn(7, model.config.hidden_size)
    noise = torch.rand(7, model.config.noise_size) - 0.5
    batched = model.sample_latent(hidden, noise)
    single = torch.cat([model.sample_latent(hidden[i : i + 1], noise[i : i + 1]) for i in range(7)])
    assert_rel_close(batched, single, 1e-6)
    logits = model.autoencoder.decode(batched[:, None])
    assert logits.shape == (7, model.config.chunk_size, model.config.vocab_size)
    # The noise matters: the head is a sampler, not a deterministic map.
    assert not torch.allclose(model.sample_latent(hidden, noise), model.sample_latent(hidden, -noise))


def test_input_validation():
    model = random_calm_model(seed=15)
    k, vocab = model.config.chunk_size, model.config.vocab_size
    with pytest.raises(ValueError, match="not a positive multiple of the chunk size K=4"):
        model.hidden_states(torch.zeros(1, k + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model.hidden_states(torch.full((1, k), vocab))
    with pytest.raises(ValueError, match="token id -1"):
        model.autoencoder.encode(torch.full((1, k), -1))
    with pytest.raises(TypeError, match="integer tensor"):
        model.hidden_states(torch.zeros(1, k))
    with pytest.raises(ValueError, match="2-D tensor"):
        model.hidden_states(torch.zeros(k, dtype=torch.long))
    with pytest.raises(ValueError, match="latents must have shape"):
        model.autoencoder.decode(torch.zeros(1, model.config.latent_size + 1))
    with pytest.raises(ValueError, match="noise must have shape"):
        model.sample_latent(torch.zeros(2, model.config.hidden_size), torch.zeros(3, model.config.noise_size))
    with pytest.raises(ValueError, match="hidden must end in"):
        model.sample_latent(torch.zeros(2, 3), torch.zeros(2, model.config.noise_size))


def test_context_and_cache_limits():
    model = random_calm_model(seed=16)
    k, context = model.config.chunk_size, model.config.max_chunks
    with pytest.raises(ValueError, match=f"exceed the model's context of {context} chunks"):
        model.hidden_states(torch.zeros(1, (context + 1) * k, dtype=torch.long))
    cache = model.new_cache(2, capacity=3)
    model.hidden_states(torch.zeros(2, 2 * k, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceed the cache capacity of 3"):
        model.hidden_states(torch.zeros(2, 2 * k, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache holds 2 sequences but ids has 1 rows"):
        model.hidden_states(torch.zeros(1, k, dtype=torch.long), cache)
    assert cache.length == 2  # failed calls leave the cache as it was
    with pytest.raises(ValueError, match="cache capacity must be in"):
        model.new_cache(1, capacity=context + 1)


def llama3_inverse_frequencies_float64(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency rule written out per frequency in float64 (independent of the implementation)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        frequency = theta ** (-i / head_dim)
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:  # high frequencies: kept
            out.append(frequency)
        elif wavelength > original / low:  # low frequencies: scaled like linear
            out.append(frequency / factor)
        else:  # in between: blended
            weight = (original / wavelength - low) / (high - low)
            out.append((1 - weight) * frequency / factor + weight * frequency)
    return torch.tensor(out, dtype=torch.float64)


LLAMA3_CASES = {
    # Llama-3.1-8B's config.json: head_dim 128, rope_theta 500000.
    "llama-3.1-8b": (
        128,
        500000.0,
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    # Small: one frequency in each regime (wavelengths 6.3 < 12.5 <= 62.8 <= 100 < 628, 6283).
    "small": (
        8,
        10000.0,
        dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0, original_max_position_embeddings=100),
    ),
    "factor 1": (
        16,
        10000.0,
        dict(factor=1.0, low_freq_factor=2.0, high_freq_factor=3.0, original_max_position_embeddings=300),
    ),
}


@pytest.mark.parametrize("case", LLAMA3_CASES)
def test_llama3_frequencies_match_the_formula_in_float64(case):
    head_dim, theta, scaling = LLAMA3_CASES[case]
    ours = rope_inverse_frequencies(head_dim, theta, {"rope_type": "llama3", **scaling})
    assert ours.dtype == torch.float32
    assert_rel_close(ours, llama3_inverse_frequencies_float64(head_dim, theta, scaling), 2e-6, case)
    if case == "small":  # each regime present, so that the test sees all three branches
        plain = rope_inverse_frequencies(head_dim, theta, None).double()
        assert (ours.double() == plain).tolist() == [True, False, False, False]
        scaled = torch.isclose(ours.double(), plain / scaling["factor"], rtol=1e-6)
        assert scaled.tolist() == [False, False, True, True]

"""The fused energy head with in-kernel noise == its torch reference (== the model's head) fed the reference noise of
the same seeds."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.energy_head import energy_head, energy_head_ref
from calm_engine.kernels.philox import uniform_noise_ref

from calm_engine.engine.weights import ModelWeights
from tests.conftest import assert_rel_close, max_rel_error
from tests.kernels.cases import HEAD_ROWS_SAMPLES, HEAD_SHAPES
from tests.kernels.conftest import DEVICE, DTYPES, cuda_only, needs_triton, poisoned
from tests.model_factory import random_calm_model

pytestmark = needs_triton


def _head(shape, dtype):
    model = random_calm_model(3, **HEAD_SHAPES[shape]).to(DEVICE, dtype)
    return ModelWeights.of(model).head


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
@pytest.mark.parametrize("rows, samples", HEAD_ROWS_SAMPLES)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_matches_reference_with_the_same_noise(shape, rows, samples, dtype, rel):
    head = _head(shape, dtype)
    hidden = torch.randn(rows, head.hidden_embed.in_features).to(DEVICE, dtype)
    seeds = torch.tensor([7, 2**33 + 1, -3][:rows], device=DEVICE)
    steps = torch.tensor([0, 11, 2**32 + 5][:rows], device=DEVICE)
    latent = head.final_second.out_features
    out = energy_head(head, hidden, seeds, steps, samples, out=poisoned(rows, samples, latent, dtype=dtype))
    noise = uniform_noise_ref(seeds.cpu(), steps.cpu(), samples, head.noise_embed.in_features).to(DEVICE)
    assert_rel_close(out, energy_head_ref(head, hidden, noise), rel, "latents")


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_reference_is_the_model_head(shape):
    """energy_head_ref does the per-row work once per row; the model's EnergyHead on every (row, sample) agrees."""
    model = random_calm_model(3, **HEAD_SHAPES[shape]).double()
    head = ModelWeights.of(model).head
    hidden = torch.randn(3, head.hidden_embed.in_features).double()
    noise = torch.rand(3, 5, head.noise_embed.in_features).double() - 0.5
    expected = model.generative_head(hidden[:, None].expand(-1, 5, -1), noise)
    assert_rel_close(energy_head_ref(head, hidden, noise), expected, 1e-12, "reference vs EnergyHead")


def test_samples_differ_and_rows_are_independent_of_the_batch():
    """A row's samples depend on its own hidden state, seed and step only: the same alone as in a batch, up to float32
    rounding. Not bit for bit: a row's position in the products' tiles changes with the batch, and the rounding of
    tl.dot may depend on it (the interpreter's tl.dot is numpy's BLAS, whose AVX2 kernels round a row differently
    at another offset in the tile). Different samples or seeds move the latents by orders of magnitude more."""
    head = _head("h40-n6-l8", torch.float32)
    hidden = torch.randn(2, 40, device=DEVICE)
    seeds, steps = torch.tensor([5, 6], device=DEVICE), torch.tensor([1, 1], device=DEVICE)
    both = energy_head(head, hidden, seeds, steps, 4)
    alone = energy_head(head, hidden[1:], seeds[1:], steps[1:], 4)
    other_seed = energy_head(head, hidden[1:], seeds[:1], steps[1:], 4)
    # float32 through the head's 8 products of at most 80 terms, each within 80 2^-24 of its magnitude; the layer
    # norms keep magnitudes O(1): a relative error below 8 * 80 * 2^-24 = 3.8e-5 of the latents' scale.
    assert_rel_close(both[1], alone[0], 8 * 80 * 2**-24, "row 1 alone vs in the batch")
    assert max_rel_error(other_seed[0], alone[0]) > 1e-2  # its own seed decides its noise
    assert (both[0, 0] - both[0, 1]).abs().max() > 1e-3  # different samples get different noise


@cuda_only
@pytest.mark.parametrize("dtype, rel", [(torch.bfloat16, 4e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_calm_m_shapes(dtype, rel):
    model = random_calm_model(1, calm=dict(hidden_size=1024, noise_size=64, num_mlp_layers=4), latent_size=128)
    head = ModelWeights.of(model.to(DEVICE, dtype)).head
    hidden = torch.randn(4, 1024, device=DEVICE, dtype=dtype)
    seeds, steps = torch.arange(4, device=DEVICE), torch.full((4,), 3, device=DEVICE)
    out = energy_head(head, hidden, seeds, steps, 200)
    noise = uniform_noise_ref(seeds.cpu(), steps.cpu(), 200, 64).to(DEVICE)
    assert_rel_close(out, energy_head_ref(head, hidden, noise), rel, "latents")


def test_validation():
    head = _head("h40-n6-l8", torch.float32)
    seeds, steps = torch.tensor([1], device=DEVICE), torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="hidden must be"):
        energy_head(head, torch.randn(1, 39, device=DEVICE), seeds, steps, 2)
    with pytest.raises(ValueError, match="int64"):
        energy_head(head, torch.randn(1, 40, device=DEVICE), seeds.int(), steps, 2)
    with pytest.raises(ValueError, match="samples"):
        energy_head(head, torch.randn(1, 40, device=DEVICE), seeds, steps, 0)

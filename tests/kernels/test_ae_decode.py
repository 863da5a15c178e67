"""decode_argmax: the fused decoder + vocabulary argmax gives the reference's ids (first index on ties)."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.ae_decode import decode_argmax, decode_argmax_ref, project_argmax

from calm_engine.engine.weights import ModelWeights
from tests.conftest import assert_rel_close
from tests.kernels.cases import AE_MODELS, AE_ROWS, ARGMAX_SIZES, ARGMAX_SPLITS
from tests.kernels.conftest import DEVICE, cuda_only, needs_triton
from tests.model_factory import random_calm_model

pytestmark = needs_triton


def _decoder(dtype=torch.float32, **shared):
    """The model's Decoder module and its description (the kernels' argument)."""
    model = random_calm_model(5, **shared).to(DEVICE, dtype)
    return model.autoencoder.decoder, ModelWeights.of(model).decoder


@pytest.mark.parametrize("rows", AE_ROWS)
@pytest.mark.parametrize("model_name", list(AE_MODELS))
def test_matches_reference(rows, model_name):
    module, decoder = _decoder(**AE_MODELS[model_name])
    latents = torch.randn(rows, decoder.latent_to_hidden.in_features, device=DEVICE)
    ids, best = decode_argmax(decoder, latents)
    ref_ids, ref_best = decode_argmax_ref(decoder, latents)
    assert ids.dtype == torch.int64 and best.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert_rel_close(best, ref_best, 2e-5, "max logit")
    logits = module(latents[:, None])  # the model's Decoder: full logits
    assert torch.equal(ref_ids, logits.argmax(dim=-1)), "reference vs the model's Decoder"
    assert_rel_close(ref_best, logits.amax(dim=-1), 2e-5, "reference max logit vs the model's Decoder")


@pytest.mark.parametrize("splits", ARGMAX_SPLITS)
@pytest.mark.parametrize("rows, vocab, dim", ARGMAX_SIZES)
def test_projection_and_ties(splits, rows, vocab, dim):
    """Every row's best embedding row is copied to a later and an earlier index: the earliest copy must win."""
    h = torch.randn(rows, dim, device=DEVICE)
    table = torch.randn(vocab, dim, device=DEVICE)
    winners = (h @ table.T).argmax(dim=1)
    row = 0
    best = int(winners[row])
    early, late = (best + vocab // 2) % vocab, (best + vocab // 3) % vocab
    table[early] = table[best]
    table[late] = table[best]
    logits = h @ table.T
    ids, val = project_argmax(h, table, splits=splits, block_m=16)
    assert torch.equal(ids, logits.argmax(dim=1))
    assert int(ids[row]) == min(best, early, late)
    assert_rel_close(val, logits.amax(dim=1), 2e-5, "max logit")


@pytest.mark.parametrize("splits", [40, 7, None])
def test_more_splits_than_one_reduction_step(splits):
    """A 5,113-word vocabulary in 40 splits (and 7, and as many as the launcher picks): the reduction walks the splits
    32 at a time; a tie in the first step must beat the same value found in a later step, and a larger value in a
    later step must win."""
    rows, vocab, dim = 3, 40 * 128 - 7, 16
    h = torch.randn(rows, dim, device=DEVICE)
    table = torch.randn(vocab, dim, device=DEVICE) * 0.1
    table[vocab - 5] = h[0] * 2  # row 0's winner sits in the last split
    table[100] = table[vocab - 5]  # ... and again in the first: index 100 must win
    table[vocab - 9] = h[1] * 2  # row 1's winner only in the last split
    logits = h @ table.T
    ids, val = project_argmax(h, table, splits=splits, block_m=16)
    assert torch.equal(ids, logits.argmax(dim=1))
    assert int(ids[0]) == 100 and int(ids[1]) == vocab - 9
    assert_rel_close(val, logits.amax(dim=1), 2e-5, "max logit")


def test_tile_overrides_are_checked():
    h, table = torch.randn(4, 16, device=DEVICE), torch.randn(50, 16, device=DEVICE)
    for bad in (8, 24, 512, 16.0):
        with pytest.raises(ValueError, match="block_m must be a power of two"):
            project_argmax(h, table, block_m=bad)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="splits must be a positive int"):
            project_argmax(h, table, splits=bad)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_calm_m_shapes_half(dtype):
    """Half precision: the kernel's fp32-accumulated argmax may differ on near ties, so check the chosen logit."""
    model = random_calm_model(2, vocab_size=128256, latent_size=128, ae=dict(hidden_size=512, intermediate_size=1280))
    model = model.to(DEVICE, dtype)
    latents = torch.randn(200, 128, device=DEVICE, dtype=dtype)
    ids, best = decode_argmax(ModelWeights.of(model).decoder, latents)
    logits = model.autoencoder.decoder(latents[:, None]).float()
    chosen = logits.gather(-1, ids[..., None])[..., 0]
    assert (logits.amax(-1) - chosen).max() <= 0.05 * logits.abs().amax()
    assert_rel_close(best, logits.amax(-1), 2e-2, "max logit")


def test_validation():
    _, decoder = _decoder(vocab_size=300)
    with pytest.raises(ValueError, match="latents must be"):
        decode_argmax(decoder, torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="Decoder"):
        decode_argmax(torch.nn.Linear(2, 2), torch.randn(3, 8))

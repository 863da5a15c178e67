"""decode_argmax: the fused decoder + vocabulary argmax gives the reference's ids (first index on ties)."""

from __future__ import annotations

import pytest
import torch

from kernels.ae_decode import decode_argmax, decode_argmax_ref, project_argmax
from tests.conftest import assert_rel_close
from tests.kernels.conftest import DEVICE, cuda_only, needs_triton
from tests.model_factory import random_calm_model

pytestmark = needs_triton


def _decoder(dtype=torch.float32, **shared):
    model = random_calm_model(5, **shared)
    return model.autoencoder.decoder.to(DEVICE, dtype)


@pytest.mark.parametrize("rows", [1, 6, 37])
@pytest.mark.parametrize("shared", [dict(vocab_size=300), dict(vocab_size=1031, patch_size=2, latent_size=13)])
def test_matches_reference(rows, shared):
    decoder = _decoder(**shared)
    latents = torch.randn(rows, decoder.config.latent_size, device=DEVICE)
    ids, best = decode_argmax(decoder, latents)
    ref_ids, ref_best = decode_argmax_ref(decoder, latents)
    assert ids.dtype == torch.int64 and best.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert_rel_close(best, ref_best, 2e-5, "max logit")


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("rows, vocab, dim", [(5, 700, 24), (33, 389, 70)])
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


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_calm_m_shapes_half(dtype):
    """Half precision: the kernel's fp32-accumulated argmax may differ on near ties, so check the chosen logit."""
    model = random_calm_model(2, vocab_size=128256, latent_size=128, ae=dict(hidden_size=512, intermediate_size=1280))
    decoder = model.autoencoder.decoder.to(DEVICE, dtype)
    latents = torch.randn(200, 128, device=DEVICE, dtype=dtype)
    ids, best = decode_argmax(decoder, latents)
    logits = decoder(latents[:, None]).float()
    chosen = logits.gather(-1, ids[..., None])[..., 0]
    assert (logits.amax(-1) - chosen).max() <= 0.05 * logits.abs().amax()
    assert_rel_close(best, logits.amax(-1), 2e-2, "max logit")


def test_validation():
    decoder = _decoder(vocab_size=300)
    with pytest.raises(ValueError, match="latents must be"):
        decode_argmax(decoder, torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="Decoder"):
        decode_argmax(torch.nn.Linear(2, 2), torch.randn(3, 8))

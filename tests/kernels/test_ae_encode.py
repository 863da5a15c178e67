"""ae_encode and compress against their torch references and the model's encoder and input compression."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.ae_encode import ae_encode, ae_encode_ref, compress, compress_ref

from calm_engine.engine.weights import ModelWeights, encoder_weights
from tests.conftest import assert_rel_close
from tests.kernels.cases import AE_MODELS, AE_ROWS
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned
from tests.model_factory import random_calm_model

pytestmark = needs_triton


@pytest.mark.parametrize("model_name", list(AE_MODELS))
@pytest.mark.parametrize("rows", AE_ROWS)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_encode_matches_reference(model_name, rows, dtype, rel):
    model = random_calm_model(4, **AE_MODELS[model_name]).to(DEVICE, dtype)
    config = model.autoencoder.config
    ids = torch.randint(0, config.vocab_size, (rows, config.patch_size), device=DEVICE)
    encoder = encoder_weights(model.autoencoder)
    mean, log_std = ae_encode(encoder, ids)
    ref_mean, ref_log_std = ae_encode_ref(encoder, ids)
    assert_rel_close(mean, ref_mean, rel, "mean")
    assert_rel_close(log_std, ref_log_std, rel, "log_std")
    whole_mean, _ = model.autoencoder.encode(ids.reshape(1, -1))
    assert_rel_close(ref_mean, whole_mean[0], 1e-6, "reference vs Autoencoder.encode")


@pytest.mark.parametrize("model_name", list(AE_MODELS))
@pytest.mark.parametrize("rows", AE_ROWS)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_compress_matches_reference(model_name, rows, dtype, rel):
    model = random_calm_model(6, **AE_MODELS[model_name]).to(DEVICE, dtype)
    table = model.backbone.embed_tokens.weight
    ids = torch.randint(0, table.shape[0], (rows, model.config.patch_size), device=DEVICE)
    compression = ModelWeights.of(model).compression
    out = compress(compression, table, ids, out=poisoned(rows, table.shape[1], dtype=dtype))
    ref = compress_ref(compression, table, ids)
    assert_rel_close(out, ref, rel, "compressed")
    assert_rel_close(ref, model.compress(ids.reshape(1, -1))[0], 1e-6, "reference vs CalmModel.compress")


def test_validation():
    model = random_calm_model(4, vocab_size=300)
    with pytest.raises(ValueError, match=r"ids must be \[M, K=4\]"):
        ae_encode(encoder_weights(model.autoencoder), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        compress(ModelWeights.of(model).compression, model.backbone.embed_tokens.weight, torch.full((2, 4), 300))
    with pytest.raises(ValueError, match="weights.Compression"):
        compress(model.embed_proj, model.backbone.embed_tokens.weight, torch.zeros(2, 4, dtype=torch.long))

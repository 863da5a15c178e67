"""The engine's PyTorch step (TorchStep) against the reference model, on random models of odd shapes."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels import ae_decode
from calm_engine.kernels.energy_head import energy_head_ref

from calm_engine.engine.kv_cache import SlotKVCache
from tests.conftest import assert_rel_close
from tests.engine.steps import torch_step
from tests.model_factory import random_calm_model

SHAPES = {
    "gqa-k4": dict(),
    "mha-k3-bias": dict(
        patch_size=3, calm=dict(num_attention_heads=2, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    ),
    "k2-gelu-3blocks": dict(patch_size=2, calm=dict(hidden_act="gelu", num_mlp_layers=3), ae=dict(hidden_act="gelu")),
}
REL = 2e-5  # float32 results of differently ordered but equal sums


def make(shape: str, dtype=torch.float32, slots: int = 5, capacity: int = 16):
    reference = random_calm_model(seed=len(shape), **SHAPES[shape]).to(dtype)
    fast = random_calm_model(seed=len(shape), **SHAPES[shape]).to(dtype)
    cache = SlotKVCache(fast.config, slots, capacity, fast.device, fast.dtype)
    return reference, fast, torch_step(fast, cache)


def random_ids(config, rows: int, chunks: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (rows, chunks * config.patch_size))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_prefill_and_decode_match_reference(shape):
    """Prompts of 1, 4 and 2 chunks prefilled together into slots 3, 0, 4, then decoded chunk by chunk."""
    reference, fast, step = make(shape)
    config = fast.config
    k = config.patch_size
    lengths = [1, 4, 2]
    slots = torch.tensor([3, 0, 4])
    full = [random_ids(config, 1, n + 3) for n in lengths]  # each prompt plus 3 chunks to decode
    for key in step.cache.keys + step.cache.values:
        # Unwritten positions must never count. Finite poison: the SDPA path masks scores, and 0 * NaN would still be
        # NaN; real caches hold zeros or a finished request's finite values there.
        key.fill_(1e3)
    padded = torch.cat([torch.cat([f[:, : n * k], f[:, : (4 - n) * k]], 1) for f, n in zip(full, lengths, strict=True)])
    hidden = step.prefill_hidden(padded, torch.tensor(lengths), slots)
    expected = torch.cat([reference.hidden_states(f[:, : n * k])[:, -1] for f, n in zip(full, lengths, strict=True)])
    assert_rel_close(hidden, expected, REL, "prefill hidden")
    for t in range(3):
        positions = torch.tensor(lengths) + t
        ids = torch.cat([f[:, (n + t) * k : (n + t + 1) * k] for f, n in zip(full, lengths, strict=True)])
        hidden = step.decode_hidden(ids, positions, slots, attend=int(positions.max()) + 1)
        expected = torch.cat(
            [reference.hidden_states(f[:, : (n + t + 1) * k])[:, -1] for f, n in zip(full, lengths, strict=True)]
        )
        assert_rel_close(hidden, expected, REL, f"decode step {t} hidden")


def test_decode_touches_only_its_slots():
    reference, fast, step = make("gqa-k4")
    before = [t.clone() for t in step.cache.keys + step.cache.values]
    ids = random_ids(fast.config, 2, 1)
    step.decode_hidden(ids, torch.tensor([0, 5]), torch.tensor([1, 3]), attend=6)
    for old, new in zip(before, step.cache.keys + step.cache.values, strict=True):
        untouched = [0, 2, 4, 5]
        assert torch.equal(old[untouched], new[untouched])
        assert not torch.equal(old[[1, 3]], new[[1, 3]])


def test_packing_keeps_the_reference_model_intact():
    """ModelWeights packs q/k/v and gate/up into single tensors; the model's own forward must not change."""
    reference, fast, step = make("mha-k3-bias")
    ids = random_ids(fast.config, 2, 3)
    assert torch.equal(fast.hidden_states(ids), reference.hidden_states(ids))
    packed = step.weights.backbone.layers[0].qkv.weight
    k_proj = fast.backbone.layers[0].self_attn.k_proj.weight
    assert packed.untyped_storage().data_ptr() == k_proj.untyped_storage().data_ptr(), "weights stored twice"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_head_matches_reference_head(shape):
    reference, fast, step = make(shape)
    config = fast.config
    hidden = torch.randn(3, config.hidden_size)
    noise = torch.rand(3, 7, config.noise_size) - 0.5
    expected = reference.generative_head(hidden[:, None].expand(3, 7, -1), noise)
    assert_rel_close(energy_head_ref(step.weights.head, hidden, noise), expected, REL, "pool latents")


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_decode_argmax_matches_reference(shape, blocked, monkeypatch):
    reference, fast, step = make(shape)
    if blocked:  # blocks of 4 rows x 23 vocabulary entries: several blocks both ways, none aligned
        monkeypatch.setattr(ae_decode, "MAX_BLOCK_LOGITS", 4 * 23)
        monkeypatch.setattr(ae_decode, "ROW_BLOCK", 4)
    latents = torch.randn(11, fast.config.latent_size)
    expected = reference.autoencoder.decode_ids(latents[:, None])
    assert torch.equal(step.ops.decode_argmax(step.weights.decoder, latents), expected)


def test_project_argmax_keeps_the_first_of_equal_maxima(monkeypatch):
    """Equal rows in three vocabulary blocks hold the largest logit. Small integers make every logit exact in float32
    whatever the BLAS's summation order (it differs with a column's position in the block on AVX2 builds, which broke
    ties of equal random rows), so the maxima are equal on every CPU and only the tie rule decides."""
    monkeypatch.setattr(ae_decode, "MAX_BLOCK_LOGITS", 2 * 5)
    monkeypatch.setattr(ae_decode, "ROW_BLOCK", 2)
    weight = torch.randint(-3, 4, (17, 6)).float()
    weight[3] = weight[14] = weight[9] = torch.tensor([4.0, -4.0, 4.0, 4.0, -4.0, 4.0])
    x = weight[9].expand(3, -1).clone()  # x.w_9 = 96 > 6 * 4 * 3 >= x.w for every other row
    logits = x @ weight.T
    assert torch.equal(logits[:, 3], logits[:, 9]) and torch.equal(logits[:, 9], logits[:, 14])
    ids, values = ae_decode.project_argmax_ref(x, weight)
    assert ids.tolist() == [3, 3, 3] and torch.equal(values, logits[:, 9])


def test_float64_model_runs_in_float64():
    reference, fast, step = make("gqa-k4", dtype=torch.float64)
    ids = random_ids(fast.config, 1, 2)
    hidden = step.prefill_hidden(ids, torch.tensor([2]), torch.tensor([0]))
    assert hidden.dtype == torch.float64
    assert_rel_close(hidden, reference.hidden_states(ids)[:, -1], 1e-12, "float64 prefill")

"""decode_attention: grouped-query, variable lengths, split or not, padding rows; against torch and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention, decode_attention_ref
from tests.conftest import assert_rel_close
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned

pytestmark = needs_triton

SHAPES = {  # batch, heads, kv heads, head dim, slots, capacity
    "gqa3-d24": (5, 6, 2, 24, 4, 300),
    "mha-d16": (3, 3, 3, 16, 3, 70),
    "gqa4-d20": (4, 8, 2, 20, 5, 129),
}


def _inputs(shape, dtype):
    batch, heads, kv_heads, dim, slots, capacity = shape
    q = torch.randn(batch, heads, dim).to(DEVICE, dtype)
    # Caches are one layer of a bigger [layers, ...] allocation, as an engine keeps them: not contiguous per layer.
    k_all = torch.randn(slots, 2, kv_heads, capacity, dim).to(DEVICE, dtype)
    v_all = torch.randn(slots, 2, kv_heads, capacity, dim).to(DEVICE, dtype)
    slot_ids = torch.randperm(slots)[:batch]
    slot_ids = torch.cat((slot_ids, torch.zeros(batch - len(slot_ids), dtype=torch.long)))
    lengths = torch.randint(1, capacity + 1, (batch,))
    lengths[0] = capacity
    lengths[-1] = 1
    return q, k_all[:, 1], v_all[:, 1], slot_ids.to(DEVICE), lengths.to(DEVICE)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_matches_reference(shape, num_splits, dtype, rel):
    q, k, v, slots, lengths = _inputs(SHAPES[shape], dtype)
    out = decode_attention(q, k, v, slots, lengths, 0.37, out=poisoned(*q.shape, dtype=dtype), num_splits=num_splits)
    ref = decode_attention_ref(q, k, v, slots, lengths, 0.37)
    assert_rel_close(out, ref, rel, "attention")
    cosine = F.cosine_similarity(out.float().flatten(1), ref.float().flatten(1), dim=1)
    assert cosine.min() > 0.999


def test_reference_matches_sdpa():
    q, k, v, slots, lengths = _inputs(SHAPES["gqa3-d24"], torch.float32)
    ref = decode_attention_ref(q, k, v, slots, lengths, 0.2)
    for b in range(q.shape[0]):
        keys = k[slots[b], :, : lengths[b]].repeat_interleave(3, dim=0)
        values = v[slots[b], :, : lengths[b]].repeat_interleave(3, dim=0)
        expected = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=0.2)[:, 0]
        assert_rel_close(ref[b], expected, 1e-5, f"row {b}")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_rows_give_zeros(num_splits):
    q, k, v, slots, lengths = _inputs(SHAPES["gqa3-d24"], torch.float32)
    slots[1] = -1  # a CUDA-graph padding row
    lengths[2] = 0
    out = decode_attention(q, k, v, slots, lengths, 0.3, out=poisoned(*q.shape), num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert_rel_close(out, decode_attention_ref(q, k, v, slots, lengths, 0.3), 2e-5, "attention")


def test_validation():
    q, k, v, slots, lengths = _inputs(SHAPES["gqa3-d24"], torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :5], k, v, slots, lengths, 1.0)
    with pytest.raises(ValueError, match="slots"):
        decode_attention(q, k, v, slots[:2], lengths, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q[..., :8], k, v, slots, lengths, 1.0)

"""decode_attention: grouped-query, variable lengths, split or not, padding rows; against torch and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from calm_engine.kernels.decode_attention import MAX_SPLITS, decode_attention, decode_attention_ref, split_plan

from tests.conftest import assert_rel_close
from tests.kernels.cases import ATTENTION_SHAPES, ATTENTION_SPLITS, attention_inputs
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned

pytestmark = needs_triton


def _inputs(shape, dtype):
    return attention_inputs(ATTENTION_SHAPES[shape], dtype, DEVICE)


@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
@pytest.mark.parametrize("num_splits", ATTENTION_SPLITS)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_matches_reference(shape, num_splits, dtype, rel):
    q, k, v, slots, lengths = _inputs(shape, dtype)
    out = decode_attention(q, k, v, slots, lengths, 0.37, out=poisoned(*q.shape, dtype=dtype), num_splits=num_splits)
    ref = decode_attention_ref(q, k, v, slots, lengths, 0.37)
    assert_rel_close(out, ref, rel, "attention")
    cosine = F.cosine_similarity(out.float().flatten(1), ref.float().flatten(1), dim=1)
    assert cosine.min() > 0.999


def test_reference_matches_sdpa():
    q, k, v, slots, lengths = _inputs("gqa3-d24", torch.float32)
    ref = decode_attention_ref(q, k, v, slots, lengths, 0.2)
    for b in range(q.shape[0]):
        keys = k[slots[b], :, : lengths[b]].repeat_interleave(3, dim=0)
        values = v[slots[b], :, : lengths[b]].repeat_interleave(3, dim=0)
        expected = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=0.2)[:, 0]
        assert_rel_close(ref[b], expected, 1e-5, f"row {b}")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_rows_give_zeros(num_splits):
    q, k, v, slots, lengths = _inputs("gqa3-d24", torch.float32)
    slots[1] = -1  # a CUDA-graph padding row
    lengths[2] = 0
    out = decode_attention(q, k, v, slots, lengths, 0.3, out=poisoned(*q.shape), num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert_rel_close(out, decode_attention_ref(q, k, v, slots, lengths, 0.3), 2e-5, "attention")


def test_split_plan():
    """The split path is what most real decode steps take: small batches over long caches split by themselves."""
    assert split_plan(1, 2, 600) == (3, 256)  # ATTENTION_SHAPES["gqa2-d32-long"] with num_splits=None
    assert split_plan(1, 16, 2048) == (8, 256)  # CALM-M at batch 1 over a full 2,048-chunk cache
    assert split_plan(64, 16, 2048) == (1, 2048)  # a full batch fills the GPU without splitting
    assert split_plan(1, 1, 1 << 16)[0] == MAX_SPLITS
    assert split_plan(5, 2, 300, 3) == (3, 128)
    splits, length = split_plan(3, 1, 1000, 7)
    assert length % 64 == 0 and (splits - 1) * length < 1000 <= splits * length


def test_validation():
    q, k, v, slots, lengths = _inputs("gqa3-d24", torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :5], k, v, slots, lengths, 1.0)
    with pytest.raises(ValueError, match="slots"):
        decode_attention(q, k, v, slots[:2], lengths, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q[..., :8], k, v, slots, lengths, 1.0)
    for bad in (0, MAX_SPLITS + 1, 2.0, True):
        with pytest.raises(ValueError, match="num_splits"):
            decode_attention(q, k, v, slots, lengths, 1.0, num_splits=bad)

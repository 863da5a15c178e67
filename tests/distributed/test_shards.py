"""shard_weights in one process: each rank's part of a layer, summed over the ranks (what the all-reduce does), equals
the whole layer, with grouped-query attention (4 heads over 2 key-value heads) and biases on the projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from calm_engine.kernels.reference import gated_mlp, linear

from calm_engine.distributed.tensor_parallel import check_sizes, shard_weights, vocab_range
from calm_engine.engine.weights import BackboneLayer, ModelWeights
from tests.conftest import assert_rel_close
from tests.model_factory import random_calm_model


def attention(layer: BackboneLayer, x: torch.Tensor, heads: int, kv_heads: int, dim: int) -> torch.Tensor:
    """Causal attention of x [B, T, hidden] through the layer's qkv and o (no rotary: it acts per head alike)."""
    batch, steps = x.shape[:2]
    q, k, v = linear(x, layer.qkv).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(batch, steps, -1, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return linear(out.transpose(1, 2).reshape(batch, steps, -1), layer.o)


@pytest.mark.parametrize("size", [1, 2])
def test_shards_add_up_to_the_whole_model(size):
    model = random_calm_model(seed=7, calm={"intermediate_size": 56})
    for module in model.backbone.modules():  # biases on every projection, to check they are added once
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.bias = torch.nn.Parameter(torch.randn(module.out_features) * 0.1, requires_grad=False)
    whole = ModelWeights.of(model)
    check_sizes(whole, size, torch.device("cpu"))
    shards = [shard_weights(whole, rank, size) for rank in range(size)]
    shapes = whole.shapes
    assert all(s.shapes.heads == shapes.heads // size and s.shapes.kv_heads == shapes.kv_heads // size for s in shards)
    x = torch.randn(3, 5, shapes.hidden)
    for i, layer in enumerate(whole.backbone.layers):
        expected = attention(layer, x, shapes.heads, shapes.kv_heads, shapes.head_dim)
        parts = [attention(s.backbone.layers[i], x, s.shapes.heads, s.shapes.kv_heads, shapes.head_dim) for s in shards]
        assert_rel_close(sum(parts), expected, 1e-5, f"layer {i} attention")
        expected = gated_mlp(x, layer.mlp)
        assert_rel_close(sum(gated_mlp(x, s.backbone.layers[i].mlp) for s in shards), expected, 1e-5, f"layer {i} mlp")
    projection = torch.cat([s.decoder.projection for s in shards])
    assert torch.equal(projection, whole.decoder.projection)
    assert [vocab_range(shapes.vocab, r, size)[1] - vocab_range(shapes.vocab, r, size)[0] for r in range(size)] == [
        s.decoder.projection.shape[0] for s in shards
    ]
    assert all(s.head is whole.head and s.compression is whole.compression for s in shards)  # replicated, not copied


def test_sizes_that_split_a_query_group_or_the_mlp_are_refused():
    whole = ModelWeights.of(random_calm_model(seed=7, calm={"intermediate_size": 56}))  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="does not divide the model's 2 key-value heads"):
        check_sizes(whole, 4, torch.device("cpu"))
    whole = ModelWeights.of(random_calm_model(seed=7, calm={"intermediate_size": 55}))
    with pytest.raises(ValueError, match="does not divide the model's 55 MLP intermediate size"):
        check_sizes(whole, 2, torch.device("cpu"))

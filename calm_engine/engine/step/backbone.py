"""The Llama backbone over the engine's cache slots, read from ModelWeights: prefill and decode -> last hidden state.

Shared by the CALM step and the token-level one (they differ in how ids become backbone inputs and how the next ids
are sampled). q/k/v and gate/up run as one product each; the rotary table is computed once for the cache's
capacity; decode attention is the ops' (PyTorch or Triton, ops.py). Under tensor parallelism the weights are one
rank's shard (distributed/tensor_parallel.py) and ops.reduce sums the two output projections' partial results.
Tested against the reference model (tests/engine/test_torch_step.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.step.ops import TorchOps
from calm_engine.engine.weights import ModelWeights, Shapes
from calm_engine.kernels.reference import gated_mlp, linear, norm
from calm_engine.model.llama import rotary_cos_sin, rotate


def rotary_table(shapes: Shapes, capacity: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [capacity, head_dim] of every chunk position (the PyTorch and C++ steps read the same table)."""
    positions = torch.arange(capacity, device=device)[None]
    cos, sin = rotary_cos_sin(positions, shapes.head_dim, shapes.rope_theta, shapes.rope_scaling, dtype)
    return cos[0], sin[0]


class SlotBackbone:
    def __init__(
        self, weights: ModelWeights, cache: SlotKVCache, ops: TorchOps, rope: tuple[torch.Tensor, torch.Tensor]
    ):
        self.weights, self.cache, self.ops = weights, cache, ops
        self.rope_cos, self.rope_sin = rope
        shapes = weights.shapes
        self.heads, self.kv_heads, self.head_dim = shapes.heads, shapes.kv_heads, shapes.head_dim

    def prefill(self, x: torch.Tensor, chunk_lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Right-padded inputs x [B, T, hidden] with chunk_lengths [B] into cache slots [B] -> last real hidden [B, H].

        Positions 0..T-1 of each slot are written (a padded row's tail is garbage that later writes overwrite before
        anything reads it). Causal attention keeps every real position blind to the padding after it.
        """
        batch, steps = x.shape[:2]
        cos, sin = self.rope_cos[:steps][:, None], self.rope_sin[:steps][:, None]
        position_index = torch.arange(steps, device=x.device)[None]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.weights.backbone.layers):
            q, k, v = linear(norm(x, layer.input_norm), layer.qkv).split(
                [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1
            )
            q = rotate(q.view(batch, steps, heads, dim), cos, sin)
            k = rotate(k.view(batch, steps, kv_heads, dim), cos, sin)
            v = v.view(batch, steps, kv_heads, dim)
            self.cache.keys[i][slots[:, None], :, position_index] = k
            self.cache.values[i][slots[:, None], :, position_index] = v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            x = x + self.ops.reduce(linear(out.transpose(1, 2).reshape(batch, steps, -1), layer.o))
            x = x + self.ops.reduce(gated_mlp(norm(x, layer.post_norm), layer.mlp))
        last = x[torch.arange(batch, device=x.device), chunk_lengths - 1]
        return norm(last, self.weights.backbone.norm)

    def decode(
        self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend: int, first_slot: int | None = None
    ) -> torch.Tensor:
        """One chunk's input per row x [B, hidden] at chunk positions [B] into slots [B] -> hidden [B, H].

        `attend` bounds the keys read (at least max(positions) + 1); `first_slot` says the rows' slots are consecutive
        (ops.DecodeAttention). A row with slot PADDING_SLOT (kv_cache.py) is a CUDA-graph padding row.
        """
        batch = x.shape[0]
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        meta = self.ops.decode_attention_metadata(positions, slots, attend, first_slot)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.weights.backbone.layers):
            qkv = linear(norm(x, layer.input_norm), layer.qkv).view(batch, heads + 2 * kv_heads, dim)
            qk = rotate(qkv[:, : heads + kv_heads], cos, sin)  # q and k rotate together: half the ops
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys[slots, :, positions] = qk[:, heads:]
            values[slots, :, positions] = qkv[:, heads + kv_heads :]
            x = x + self.ops.reduce(linear(self.ops.decode_attention(qk[:, :heads], keys, values, meta), layer.o))
            x = x + self.ops.reduce(gated_mlp(norm(x, layer.post_norm), layer.mlp))
        return norm(x, self.weights.backbone.norm)

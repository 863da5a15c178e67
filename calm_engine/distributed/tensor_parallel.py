"""Tensor parallelism of the PyTorch step: one rank's shard of ModelWeights, and the ops that make the shards add up.

Megatron-style sharding of the backbone: attention by heads (rank r holds query heads [r*H/N, (r+1)*H/N) and the key-
value heads of their groups, so its KV cache holds KVH/N heads), the gated MLP by the intermediate dimension (gate and
up by rows, down by columns); each of the two output projections (o, down) gives a partial sum that one all-reduce
completes (ParallelOps.reduce). The autoencoder's vocabulary projection is split into N contiguous row ranges; each
rank finds its (max logit, first index) and the ranks exchange only those pairs: the highest logit wins, a tie goes
to the lowest global index (the lowest rank), as torch.argmax over the whole vocabulary. Input compression and the
energy head are replicated: their noise is keyed by (seed, counter), so every rank draws the same and all ranks
sample the same chunks. Per decode step and layer that is two all-reduces of [B, hidden] and one all-gather of
[B * S * K] (max, index) pairs (benchmarks/tp_ab.py counts the bytes).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from calm_engine.engine.step.ops import DecodeAttention, TorchOps
from calm_engine.engine.weights import Backbone, BackboneLayer, Decoder, GatedMLP, Linear, ModelWeights


def check_sizes(weights: ModelWeights, size: int, device: torch.device) -> None:
    """Refuse a tensor_parallel_size that cannot shard this model on these devices (before any process starts)."""
    shapes = weights.shapes
    if not weights.is_calm:
        raise ValueError("tensor_parallel_size > 1 runs CALM models; the token-level baseline runs in one process")
    intermediate = weights.backbone.layers[0].mlp.down.in_features
    for name, count in (("attention heads", shapes.heads), ("key-value heads", shapes.kv_heads),
                        ("MLP intermediate size", intermediate)):  # fmt: skip
        if count % size:
            raise ValueError(
                f"tensor_parallel_size={size} does not divide the model's {count} {name}: use a divisor of "
                f"gcd(heads={shapes.heads}, kv_heads={shapes.kv_heads})"
            )
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size={size} needs one GPU per rank, and this machine has {torch.cuda.device_count()}"
        )


def vocab_range(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's rows [start, stop) of the vocabulary projection: contiguous, the first vocab % size ranks one longer."""
    base, extra = divmod(vocab, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _rows(linear: Linear, ranges: list[tuple[int, int]]) -> Linear:
    weight = torch.cat([linear.weight[a:b] for a, b in ranges])
    bias = None if linear.bias is None else torch.cat([linear.bias[a:b] for a, b in ranges])
    return Linear(weight.contiguous(), bias)


def _columns(linear: Linear, start: int, stop: int, keep_bias: bool) -> Linear:
    return Linear(linear.weight[:, start:stop].contiguous(), linear.bias if keep_bias else None)


def shard_weights(weights: ModelWeights, rank: int, size: int) -> ModelWeights:
    """Rank's shard: backbone attention by heads, MLP by intermediate rows, vocabulary projection by rows; the rest
    shared (the same tensors). The output projections' biases stay on rank 0 only, so the all-reduce adds them once."""
    shapes = weights.shapes
    dim, heads, kv_heads = shapes.head_dim, shapes.heads // size, shapes.kv_heads // size
    q = (rank * heads * dim, (rank + 1) * heads * dim)
    k_start = shapes.heads * dim + rank * kv_heads * dim
    v_start = k_start + shapes.kv_heads * dim
    qkv_rows = [q, (k_start, k_start + kv_heads * dim), (v_start, v_start + kv_heads * dim)]
    layers = []
    for layer in weights.backbone.layers:
        intermediate = layer.mlp.down.in_features
        width = intermediate // size
        gate = (rank * width, (rank + 1) * width)
        up = (intermediate + gate[0], intermediate + gate[1])
        mlp = GatedMLP(
            _rows(layer.mlp.gate_up, [gate, up]),
            _columns(layer.mlp.down, rank * width, (rank + 1) * width, rank == 0),
            layer.mlp.activation,
        )
        layers.append(
            BackboneLayer(
                layer.input_norm, _rows(layer.qkv, qkv_rows), _columns(layer.o, *q, rank == 0), layer.post_norm, mlp
            )
        )
    start, stop = vocab_range(shapes.vocab, rank, size)
    decoder = dataclasses.replace(weights.decoder, projection=weights.decoder.projection[start:stop].contiguous())
    return dataclasses.replace(
        weights,
        shapes=dataclasses.replace(shapes, heads=heads, kv_heads=kv_heads),
        backbone=Backbone(weights.backbone.embed, tuple(layers), weights.backbone.norm),
        decoder=decoder,
    )


class ParallelOps(TorchOps):
    """The ops of one rank: `base`'s (PyTorch or Triton) on the shard, plus the all-reduce of the output projections
    and the distributed argmax over the vocabulary shards (process group: torch.distributed's default)."""

    def __init__(self, base: TorchOps, rank: int, size: int, vocab: int):
        self.base, self.rank, self.size = base, rank, size
        self.vocab_start = vocab_range(vocab, rank, size)[0]
        self.name = f"{base.name}, tensor parallel x{size}"

    def compress(self, compression, embed, ids):
        return self.base.compress(compression, embed, ids)

    def head(self, head, hidden, seeds, counters, samples, noise):
        return self.base.head(head, hidden, seeds, counters, samples, noise)

    def decode_attention_metadata(self, positions, slots, attend, first_slot) -> DecodeAttention:
        return self.base.decode_attention_metadata(positions, slots, attend, first_slot)

    def decode_attention(self, q, keys, values, meta):
        return self.base.decode_attention(q, keys, values, meta)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial)
        return partial

    def decode_argmax_max(self, decoder: Decoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, values = self.base.decode_argmax_max(decoder, latents)
        return global_argmax(ids + self.vocab_start, values, self.size)


def global_argmax(ids: torch.Tensor, values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (global first index, max) of its vocabulary rows -> the global (first argmax, max), on every
    rank: all-gather the pairs, then combine_argmax."""
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_ids = [torch.empty_like(ids) for _ in range(size)]
    dist.all_gather(all_values, values.contiguous())
    dist.all_gather(all_ids, ids.contiguous())
    return combine_argmax(torch.stack(all_ids), torch.stack(all_values))


def combine_argmax(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, values [ranks, ...] of ascending row ranges -> (first global argmax, max) [...]. Among equal maxima the
    lowest rank holds the lowest index, and argmax over the ranks (first index on ties) picks it."""
    winner = values.argmax(0, keepdim=True)
    return ids.gather(0, winner)[0], values.gather(0, winner)[0]

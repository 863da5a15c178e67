"""The engine's KV cache: one preallocated slot per concurrent request, sized from the config and a memory budget.

Layout per layer: keys/values [slots + 1, kv_heads, capacity, head_dim]. The extra last slot is a scratch sink for
padding rows. The padding-row convention, one for every path: a padding row (a CUDA-graph bucket's rows beyond the
batch) has slot PADDING_SLOT = -1. Writes index the cache with it, which in PyTorch is the last slot, the scratch
sink; the decode-attention kernel reads nothing for it (kernels/decode_attention.py); the PyTorch attention reads the
scratch slot, whose contents only padding rows see. No padding row touches a live request's cache.

Why static slots rather than paged blocks: positions count K-token chunks, so a CALM context is K times shorter
than a token model's (the official checkpoints: 2048 chunks = 8192 tokens) and a full-context slot of CALM-M is
16 layers x 2 x 16 heads x 64 x 2048 x 2 bytes = 128 MiB in bf16; fragmentation matters less than for token models,
and a contiguous slot lets decode attention read each row's keys as one strided block with no page table. The
price: a slot reserves `max_model_len` whatever the request's actual length.
"""

from __future__ import annotations

import math

import torch

from calm_engine.model.config import CalmConfig

PADDING_SLOT = -1


class KVCacheError(ValueError):
    """The cache cannot be sized as asked."""


def kv_cache_bytes(config: CalmConfig, slots: int, capacity: int, dtype: torch.dtype, shards: int = 1) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    kv_heads = config.num_key_value_heads // shards
    per_slot = 2 * config.num_hidden_layers * kv_heads * capacity * config.head_dim * element
    return (slots + 1) * per_slot


class SlotKVCache:
    def __init__(
        self,
        config: CalmConfig,
        slots: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        budget_bytes: int | None = None,
        shards: int = 1,
    ):
        """shards: tensor-parallel ranks; each holds kv_heads / shards heads (its query heads' groups)."""
        if slots < 1:
            raise KVCacheError(f"max_batch_size must be >= 1, got {slots}")
        if not 1 <= capacity <= config.max_chunks:
            raise KVCacheError(
                f"max_model_len must give between 1 and {config.max_chunks} chunks of K={config.chunk_size} tokens "
                f"(the model's context is {config.max_chunks * config.chunk_size} tokens), got {capacity} chunks"
            )
        needed = kv_cache_bytes(config, slots, capacity, dtype, shards)
        if budget_bytes is not None and needed > budget_bytes:
            fit = max(0, budget_bytes // kv_cache_bytes(config, 0, capacity, dtype, shards) - 1)
            raise KVCacheError(
                f"the KV cache needs {needed / 2**30:.2f} GiB for max_batch_size={slots} x max_model_len="
                f"{capacity * config.chunk_size} tokens, over the budget of {budget_bytes / 2**30:.2f} GiB; "
                f"at this max_model_len at most {fit} requests fit: lower max_batch_size or max_model_len, or raise "
                "kv_cache_memory"
            )
        shape = (slots + 1, config.num_key_value_heads // shards, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.config, self.shards = config, shards
        self.slots = slots
        self.capacity = capacity
        self.bytes = needed


def capacity_for(config: CalmConfig, max_model_len: int | None) -> int:
    """Chunks per slot for a token budget (default: the model's whole context)."""
    if max_model_len is None:
        return config.max_chunks
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise KVCacheError(f"max_model_len must be a positive number of tokens, got {max_model_len!r}")
    return math.ceil(max_model_len / config.chunk_size)

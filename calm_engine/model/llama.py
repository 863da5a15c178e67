"""The Llama backbone over chunk positions, with a simple contiguous KV cache.

Plain PyTorch, the reference the engine's fast paths are checked against. It computes what transformers 4.43's
`LlamaModel` computes for the official checkpoints (names follow its state dict under the `transformer.` prefix):
RMSNorm, rotary embeddings (half-split, float32 angles, optional linear or Llama-3.1 scaling), grouped-query
attention, gated MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm_engine.model.config import CalmConfig
from calm_engine.model.layers import GatedMLP, RMSNorm


def rope_inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None, device=None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] in float32, scaled as the config's rope_scaling says.

    theta^(-2i/D); 'linear' divides each by factor; 'llama3' (Llama 3.1) divides by factor only the frequencies whose
    wavelength 2 pi / f exceeds original_max_position_embeddings / low_freq_factor, keeps those shorter than
    original_max_position_embeddings / high_freq_factor, and in between blends f / factor and f with weight
    s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor) on f.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = None if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(rope_scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = rope_scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        blend = (original / wavelength - low) / (high - low)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(between, blended, scaled)
    assert kind is None, f"rope_scaling type {kind!r} passed config validation"
    return inv_freq


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, rope_scaling: dict | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, head_dim]; angles in float32 whatever the model dtype."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, rope_scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [..., D] by cos/sin that broadcast against it (the half-split convention: pairs
    (i, i + D/2)). The one rotary formula: the model and the engine's PyTorch step call it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by cos/sin [B, T, D]."""
    return rotate(x, cos[:, None], sin[:, None])


class KVCache:
    """Preallocated keys/values for a batch of sequences that all have the same length.

    keys[layer] and values[layer] are [B, kv_heads, capacity, head_dim]; `length` chunks are filled. This is the
    reference model's cache; the engine manages its own per-request cache.
    """

    def __init__(self, config: CalmConfig, batch_size: int, capacity: int, device, dtype: torch.dtype):
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch_size = batch_size
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, kv_heads, T, D] at positions length..length+T; return everything cached so far for `layer`."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: CalmConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.write(self.layer_index, k, v)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=steps > 1)
        else:
            # Query i sits at position past+i and sees keys 0..past+i.
            key_pos = torch.arange(past + steps, device=x.device)
            query_pos = torch.arange(past, past + steps, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: CalmConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """Token embedding (used by the input compression) + decoder layers + final norm; no LM head."""

    def __init__(self, config: CalmConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """inputs_embeds [B, T, hidden] at chunk positions start..start+T-1 -> normed hidden [B, T, hidden].

        start is cache.length (0 without a cache); the cache is extended by T.
        """
        batch, steps, _ = inputs_embeds.shape
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + steps, device=inputs_embeds.device).expand(batch, steps)
        cos, sin = rotary_cos_sin(
            positions, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, inputs_embeds.dtype
        )
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.length += steps
        return self.norm(x)

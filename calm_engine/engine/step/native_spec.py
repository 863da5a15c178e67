"""The C++ step's description of the model as today's csrc/decode_step.cpp constructor reads it: a string-keyed dict.

Built from ModelWeights in this one function. When the typed binding lands (csrc/ on branch i19-csrc), this file goes:
native_step.py then builds the step from calm_engine/engine/step/native_weights.py's
`native_step_weights(weights, cache.keys, cache.values, rope_cos, rope_sin)` instead (one call to change there).
"""

from __future__ import annotations

import numpy as np
import torch

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.weights import Linear, ModelWeights, Norm


def legacy_step_spec(
    weights: ModelWeights, cache: SlotKVCache, rope_cos: torch.Tensor, rope_sin: torch.Tensor
) -> tuple[dict, list[np.ndarray]]:
    """The C++ step's constructor arguments as today's csrc reads them: a string-keyed spec whose entries index a list
    of float32 arrays (numpy views of the weights and the KV cache: the step reads the very same memory)."""
    arrays: list[np.ndarray] = []

    def index(tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return -1
        if not tensor.is_contiguous() or tensor.dtype != torch.float32:
            raise ValueError("the C++ step: weights must be contiguous float32")
        arrays.append(tensor.detach().numpy())
        return len(arrays) - 1

    def linear(linear: Linear) -> tuple[int, int]:
        return index(linear.weight), index(linear.bias)

    def norm(norm: Norm) -> tuple[int, int, float]:
        return index(norm.weight), index(norm.bias), norm.eps

    shapes, backbone, compression, head, decoder = (
        weights.shapes, weights.backbone, weights.compression, weights.head, weights.decoder,
    )  # fmt: skip
    spec = {
        "hidden": shapes.hidden,
        "heads": shapes.heads,
        "kv_heads": shapes.kv_heads,
        "head_dim": shapes.head_dim,
        "patch": shapes.chunk_size,
        "noise": shapes.noise,
        "latent": shapes.latent,
        "ae_hidden": shapes.decoder_hidden,
        "vocab": shapes.vocab,
        "capacity": cache.capacity,
        "slots": cache.slots,
        "act": shapes.activation,
        "ae_act": shapes.decoder_activation,
        "embed": index(backbone.embed),
        "compress0": linear(compression.first),
        "compress2": linear(compression.second),
        "compress_norm": norm(compression.norm),
        "rope_cos": index(rope_cos),
        "rope_sin": index(rope_sin),
        "layers": [
            {
                "input_norm": norm(layer.input_norm),
                "qkv": linear(layer.qkv),
                "o": linear(layer.o),
                "post_norm": norm(layer.post_norm),
                "gate_up": linear(layer.mlp.gate_up),
                "down": linear(layer.mlp.down),
                "keys": index(cache.keys[i]),
                "values": index(cache.values[i]),
            }
            for i, layer in enumerate(backbone.layers)
        ],
        "final_norm": norm(backbone.norm),
        "hidden_embd": linear(head.hidden_embed),
        "noise_embd": linear(head.noise_embed),
        "norm_hidden": norm(head.hidden_norm),
        "norm_noise": norm(head.noise_norm),
        "head_blocks": [
            {
                "in_ln": norm(block.norm),
                "noise_half": linear(block.noise_half),
                "hidden_half": linear(block.hidden_half),
                "second": linear(block.second),
                "third": linear(block.third),
                "down": linear(block.down),
            }
            for block in head.blocks
        ],
        "final_ln": norm(head.final_norm),
        "final0": linear(head.final_first),
        "final2": linear(head.final_second),
        "latent_to_hidden": linear(decoder.latent_to_hidden),
        "expand": linear(decoder.expand),
        "ae_layers": [
            {"norm": norm(layer.norm), "gate_up": linear(layer.mlp.gate_up), "down": linear(layer.mlp.down)}
            for layer in decoder.layers
        ],
        "ae_norm": norm(decoder.norm),
        "lm_head": (index(decoder.projection), -1),
    }
    return spec, arrays

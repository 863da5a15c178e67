"""native_step_weights: the engine's ModelWeights, KV cache and rotary tables as the C++ step's typed StepWeights
(csrc/step_weights.h): numpy views of the very same memory, nothing copied. The C++ constructor checks every array
(float32, C-contiguous, its shape against Shapes; the cache writable) and names the field that does not fit."""

from __future__ import annotations

import torch

from calm_engine import native
from calm_engine.engine.weights import GatedMLP, Linear, ModelWeights, Norm


def native_step_weights(
    weights: ModelWeights,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
) -> native.calm_cpu.StepWeights:
    """A CALM model's weights (ModelWeights.of), its KV cache per layer (keys, values [slots + 1, kv_heads, capacity,
    head_dim]; the step writes them) and the rotary tables [capacity, head_dim] -> `_calm_cpu.StepWeights`.

    ValueError (from the C++ checks) naming the field whose type, layout or shape does not fit; RuntimeError where the
    extension is not built; ValueError for a token-level model, which the C++ step does not run."""
    calm_cpu = native.calm_cpu
    if calm_cpu is None:
        raise RuntimeError("native_step_weights: calm_engine._calm_cpu is not built")
    if not weights.is_calm:
        raise ValueError("native_step_weights: the C++ step runs CALM models only (these weights have no energy head)")
    parts = calm_cpu.StepWeights

    def array(tensor: torch.Tensor | None):
        return None if tensor is None else tensor.detach().numpy()  # a view: the step reads the very same memory

    def linear(linear: Linear):
        return parts.Linear(array(linear.weight), array(linear.bias))

    def norm(norm: Norm):
        return parts.Norm(array(norm.weight), array(norm.bias), norm.eps)

    def mlp(mlp: GatedMLP):
        return parts.GatedMLP(linear(mlp.gate_up), linear(mlp.down), mlp.activation)

    s, backbone, compression, head, decoder = (
        weights.shapes, weights.backbone, weights.compression, weights.head, weights.decoder,
    )  # fmt: skip
    return parts(
        shapes=parts.Shapes(
            hidden=s.hidden,
            heads=s.heads,
            kv_heads=s.kv_heads,
            head_dim=s.head_dim,
            chunk_size=s.chunk_size,
            vocab=s.vocab,
            activation=s.activation,
            noise=s.noise,
            latent=s.latent,
            decoder_hidden=s.decoder_hidden,
            decoder_activation=s.decoder_activation,
        ),
        backbone=parts.Backbone(
            embed=array(backbone.embed),
            layers=[
                parts.BackboneLayer(
                    input_norm=norm(layer.input_norm),
                    qkv=linear(layer.qkv),
                    o=linear(layer.o),
                    post_norm=norm(layer.post_norm),
                    mlp=mlp(layer.mlp),
                )
                for layer in backbone.layers
            ],
            norm=norm(backbone.norm),
        ),
        compression=parts.Compression(
            first=linear(compression.first), second=linear(compression.second), norm=norm(compression.norm)
        ),
        head=parts.EnergyHead(
            hidden_embed=linear(head.hidden_embed),
            hidden_norm=norm(head.hidden_norm),
            noise_embed=linear(head.noise_embed),
            noise_norm=norm(head.noise_norm),
            blocks=[
                parts.HeadBlock(
                    norm=norm(b.norm),
                    noise_half=linear(b.noise_half),
                    hidden_half=linear(b.hidden_half),
                    second=linear(b.second),
                    third=linear(b.third),
                    down=linear(b.down),
                )
                for b in head.blocks
            ],
            final_norm=norm(head.final_norm),
            final_first=linear(head.final_first),
            final_second=linear(head.final_second),
        ),
        decoder=parts.Decoder(
            latent_to_hidden=linear(decoder.latent_to_hidden),
            layers=[parts.DecoderLayer(norm=norm(layer.norm), mlp=mlp(layer.mlp)) for layer in decoder.layers],
            expand=linear(decoder.expand),
            norm=norm(decoder.norm),
            projection=array(decoder.projection),
        ),
        keys=[array(t) for t in keys],
        values=[array(t) for t in values],
        rope_cos=array(rope_cos),
        rope_sin=array(rope_sin),
    )

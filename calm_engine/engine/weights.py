"""ModelWeights: one typed description of a loaded model's weights and shapes, built once, read by every step backend.

The reference modules (calm_engine/model) are the specification and own the parameters. The engine's backends need
the same weights in a few fused layouts: q/k/v and gate/up packed into one matrix each (one product instead of two
or three), the energy head's first linear split into its noise half (run per sample) and its hidden half (run once
per row). `ModelWeights.of(model)` builds those layouts once; the modules' parameters become views of the packed
tensors, so nothing is stored twice (the head's two halves are the one exception: contiguous copies, so that each is
read as one stream). The PyTorch step, the Triton kernels, the CUDA-graph buffers and the C++ step all read this one
description; none of them reads a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.calm import CalmModel
from calm_engine.model.layers import RMSNorm
from calm_engine.model.token_llama import TokenLlama


@dataclass(frozen=True)
class Linear:
    """y = x @ weight.T + bias: weight [out, in], bias [out] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class Norm:
    """RMSNorm (bias None) or LayerNorm (with bias): weight [size], eps."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @property
    def is_layer_norm(self) -> bool:
        return self.bias is not None


@dataclass(frozen=True)
class GatedMLP:
    """down(act(gate) * up) with gate_up = [gate rows; up rows] packed into one Linear."""

    gate_up: Linear
    down: Linear
    activation: str


@dataclass(frozen=True)
class BackboneLayer:
    input_norm: Norm
    qkv: Linear  # [q heads; k heads; v heads] rows packed
    o: Linear
    post_norm: Norm
    mlp: GatedMLP


@dataclass(frozen=True)
class Backbone:
    embed: torch.Tensor  # [vocab, hidden]
    layers: tuple[BackboneLayer, ...]
    norm: Norm


@dataclass(frozen=True)
class Compression:
    """A chunk's K token embeddings side by side [K * hidden] -> first -> SiLU -> second -> LayerNorm -> [hidden]."""

    first: Linear
    second: Linear
    norm: Norm


@dataclass(frozen=True)
class HeadBlock:
    """An energy-head block, its first linear split: noise_half (per sample, no bias) and hidden_half (per row,
    carrying the first linear's bias); then SiLU, second, SiLU, third (gate rows then up rows), SiLU(gate) * up,
    down, added to the block's input."""

    norm: Norm
    noise_half: Linear
    hidden_half: Linear
    second: Linear
    third: Linear
    down: Linear


@dataclass(frozen=True)
class EnergyHead:
    """noise -> noise_embed -> noise_norm -> blocks (each conditioned on hidden_norm(hidden_embed(hidden))) ->
    final_norm -> final_first -> SiLU -> final_second -> latent."""

    hidden_embed: Linear
    hidden_norm: Norm
    noise_embed: Linear
    noise_norm: Norm
    blocks: tuple[HeadBlock, ...]
    final_norm: Norm
    final_first: Linear
    final_second: Linear


@dataclass(frozen=True)
class DecoderLayer:
    """x + mlp(norm(x)) (RMSNorm)."""

    norm: Norm
    mlp: GatedMLP


@dataclass(frozen=True)
class Decoder:
    """The autoencoder's decoder: latent -> hidden, the first half of the layers, expand to K rows, the second half,
    the norm, then the vocabulary projection [vocab, hidden] (argmax only: the engine never needs the logits)."""

    latent_to_hidden: Linear
    layers: tuple[DecoderLayer, ...]
    expand: Linear
    norm: Norm
    projection: torch.Tensor

    @property
    def stage(self) -> int:
        """Layers before `expand`: the first half."""
        return len(self.layers) // 2


@dataclass(frozen=True)
class Encoder:
    """The autoencoder's encoder (the engine never runs it; the Triton encode kernel and its tests read it): token
    embeddings, the first half of the layers per token, squeeze of the K token vectors into one, the second half,
    the norm, then to_latent [2 * latent, hidden] (mean rows, then log-std rows). Its layers have the decoder's
    structure (DecoderLayer)."""

    embed: torch.Tensor
    layers: tuple[DecoderLayer, ...]
    squeeze: Linear
    norm: Norm
    to_latent: Linear


@dataclass(frozen=True)
class Shapes:
    """The sizes a backend allocates by. The last four are 0 / "" for a token-level model."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    chunk_size: int  # K, the tokens of one step (the config's `patch_size`)
    vocab: int
    activation: str
    rope_theta: float
    rope_scaling: dict | None
    noise: int = 0
    latent: int = 0
    decoder_hidden: int = 0
    decoder_activation: str = ""


@dataclass(frozen=True)
class ModelWeights:
    """Everything a step backend reads. CALM: compression, head and decoder; a token-level Llama: lm_head instead."""

    shapes: Shapes
    backbone: Backbone
    compression: Compression | None = None
    head: EnergyHead | None = None
    decoder: Decoder | None = None
    lm_head: Linear | None = None

    @property
    def is_calm(self) -> bool:
        return self.head is not None

    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm.weight.dtype

    @classmethod
    def of(cls, model: CalmModel | TokenLlama) -> ModelWeights:
        """The description of a loaded CalmModel or TokenLlama. Packs q/k/v and gate/up (the modules' parameters
        become views of the packed tensors) and splits the head's first linears."""
        if isinstance(model, CalmModel):
            return _calm_weights(model)
        if isinstance(model, TokenLlama):
            config = model.config
            return cls(_shapes(config), _backbone(model), lm_head=Linear(model.lm_head.weight))
        raise TypeError(f"ModelWeights.of needs a CalmModel or a TokenLlama, got {type(model).__name__}")


def encoder_weights(autoencoder: Autoencoder) -> Encoder:
    """The description of an autoencoder's encoder (gate/up packed, the modules' parameters views of them)."""
    encoder, activation = autoencoder.encoder, autoencoder.config.hidden_act
    return Encoder(
        embed=encoder.embed_tokens.weight,
        layers=tuple(
            DecoderLayer(norm(layer.layernorm), gated_mlp(layer.mlp, activation)) for layer in encoder.encoder_layers
        ),
        squeeze=linear(encoder.squeeze_layer),
        norm=norm(encoder.norm),
        to_latent=linear(encoder.hidden_to_latent),
    )


def pack(modules: list[nn.Linear]) -> Linear:
    """The linears' weights (and biases) concatenated by rows; each module's parameters become views of the result.

    Modules packed before (their parameters already adjacent rows of one tensor) give that tensor again, so a second
    engine on the same model stores nothing twice."""
    weight = _adjacent(m.weight for m in modules)
    has_bias = modules[0].bias is not None
    bias = _adjacent(m.bias for m in modules) if has_bias else None
    if weight is not None and (bias is not None or not has_bias):
        return Linear(weight, bias)
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if has_bias else None
    start = 0
    for m in modules:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return Linear(weight, bias)


def _adjacent(tensors) -> torch.Tensor | None:
    """The tensors as one view when they are contiguous blocks that follow each other in one storage, else None."""
    tensors = [t.detach() for t in tensors]
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.storage_offset() != offset
            or t.shape[1:] != first.shape[1:]
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def linear(module: nn.Linear) -> Linear:
    return Linear(module.weight, module.bias)


def norm(module: nn.Module) -> Norm:
    """An RMSNorm (no bias) or an nn.LayerNorm."""
    if isinstance(module, RMSNorm):
        return Norm(module.weight, None, float(module.eps))
    if isinstance(module, nn.LayerNorm):
        return Norm(module.weight, module.bias, float(module.eps))
    raise TypeError(f"not a norm: {type(module).__name__}")


def gated_mlp(mlp: nn.Module, activation: str) -> GatedMLP:
    return GatedMLP(pack([mlp.gate_proj, mlp.up_proj]), linear(mlp.down_proj), activation)


def _shapes(config, ae_config=None) -> Shapes:
    calm = {}
    if ae_config is not None:
        calm = dict(
            noise=config.noise_size,
            latent=config.latent_size,
            decoder_hidden=ae_config.hidden_size,
            decoder_activation=ae_config.hidden_act,
        )
    return Shapes(
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        chunk_size=config.patch_size,
        vocab=config.vocab_size,
        activation=config.hidden_act,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        **calm,
    )


def _backbone(model: CalmModel | TokenLlama) -> Backbone:
    backbone, activation = model.backbone, model.config.hidden_act
    layers = tuple(
        BackboneLayer(
            input_norm=norm(layer.input_layernorm),
            qkv=pack([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
            o=linear(layer.self_attn.o_proj),
            post_norm=norm(layer.post_attention_layernorm),
            mlp=gated_mlp(layer.mlp, activation),
        )
        for layer in backbone.layers
    )
    return Backbone(backbone.embed_tokens.weight, layers, norm(backbone.norm))


def _head_block(block: nn.Module, channels: int) -> HeadBlock:
    first, second, third = block.linears[0], block.linears[2], block.linears[4]
    weight = first.weight.detach()
    return HeadBlock(
        norm=norm(block.in_ln),
        noise_half=Linear(weight[:, :channels].contiguous()),
        hidden_half=Linear(weight[:, channels:].contiguous(), first.bias),
        second=linear(second),
        third=linear(third),
        down=linear(block.down_proj),
    )


def _calm_weights(model: CalmModel) -> ModelWeights:
    config, head, decoder = model.config, model.generative_head, model.autoencoder.decoder
    ae_activation = model.autoencoder.config.hidden_act
    proj = model.embed_proj
    final = head.final_layer
    return ModelWeights(
        shapes=_shapes(config, model.autoencoder.config),
        backbone=_backbone(model),
        compression=Compression(linear(proj[0]), linear(proj[2]), norm(proj[3])),
        head=EnergyHead(
            hidden_embed=linear(head.hidden_embd),
            hidden_norm=norm(head.norm_hidden),
            noise_embed=linear(head.noise_embd),
            noise_norm=norm(head.norm_noise),
            blocks=tuple(_head_block(b, config.hidden_size) for b in head.mlp_blocks),
            final_norm=norm(final.in_ln),
            final_first=linear(final.linears[0]),
            final_second=linear(final.linears[2]),
        ),
        decoder=Decoder(
            latent_to_hidden=linear(decoder.latent_to_hidden),
            layers=tuple(
                DecoderLayer(norm(layer.layernorm), gated_mlp(layer.mlp, ae_activation))
                for layer in decoder.decoder_layers
            ),
            expand=linear(decoder.expand_layer),
            norm=norm(decoder.norm),
            projection=decoder.lm_head_weight,
        ),
    )

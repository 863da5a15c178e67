"""ModelWeights against the reference modules it describes: the same tensors, packed without copies, and the same
functions where a layout changes (packed q/k/v and gate/up, the head's split first linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm_engine.engine.weights import ModelWeights
from tests.conftest import assert_rel_close
from tests.model_factory import random_calm_model, random_token_llama

SHAPES = {
    "gqa-k4": dict(),
    "mha-k3-bias": dict(
        patch_size=3, calm=dict(num_attention_heads=2, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    ),
    "k2-gelu-3blocks": dict(patch_size=2, calm=dict(hidden_act="gelu", num_mlp_layers=3), ae=dict(hidden_act="gelu")),
}


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shapes_come_from_the_configs(shape):
    model = random_calm_model(seed=1, **SHAPES[shape])
    config, ae = model.config, model.autoencoder.config
    shapes = ModelWeights.of(model).shapes
    assert (shapes.hidden, shapes.heads, shapes.kv_heads, shapes.head_dim) == (
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
    )  # fmt: skip
    assert (shapes.chunk_size, shapes.vocab, shapes.activation) == (config.patch_size, config.vocab_size,
                                                                    config.hidden_act)  # fmt: skip
    assert (shapes.noise, shapes.latent, shapes.decoder_hidden, shapes.decoder_activation) == (
        config.noise_size, config.latent_size, ae.hidden_size, ae.hidden_act,
    )  # fmt: skip
    assert (shapes.rope_theta, shapes.rope_scaling) == (config.rope_theta, config.rope_scaling)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_packed_layers_are_the_module_weights_stored_once(shape):
    reference = random_calm_model(seed=2, **SHAPES[shape])
    model = random_calm_model(seed=2, **SHAPES[shape])
    weights = ModelWeights.of(model)
    for layer, module, original in zip(
        weights.backbone.layers, model.backbone.layers, reference.backbone.layers, strict=True
    ):
        attn = original.self_attn
        assert torch.equal(layer.qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        if attn.q_proj.bias is None:
            assert layer.qkv.bias is None
        else:
            assert torch.equal(layer.qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert same_memory(layer.qkv.weight, module.self_attn.v_proj.weight), "q/k/v stored twice"
        assert same_memory(layer.mlp.gate_up.weight, module.mlp.up_proj.weight), "gate/up stored twice"
        assert layer.o.weight is module.self_attn.o_proj.weight
        assert layer.input_norm.bias is None and layer.input_norm.eps == module.input_layernorm.eps
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * model.config.patch_size))
    assert torch.equal(model.hidden_states(ids), reference.hidden_states(ids)), "packing changed the model"
    assert weights.decoder.projection is model.autoencoder.decoder.lm_head_weight
    assert weights.backbone.embed is model.backbone.embed_tokens.weight


def test_a_second_description_reuses_the_packed_tensors():
    model = random_calm_model(seed=3)
    first, second = ModelWeights.of(model), ModelWeights.of(model)
    for a, b in zip(first.backbone.layers, second.backbone.layers, strict=True):
        assert a.qkv.weight.data_ptr() == b.qkv.weight.data_ptr() and torch.equal(a.qkv.weight, b.qkv.weight)
        assert a.mlp.gate_up.weight.data_ptr() == b.mlp.gate_up.weight.data_ptr()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_head_blocks_compute_the_reference_blocks(shape):
    """noise_half(LN(x)) + hidden_half(c) is the block's first linear of [LN(x) | c]; the rest is the block's own."""
    model = random_calm_model(seed=4, **SHAPES[shape]).double()
    weights = ModelWeights.of(model)
    head = model.generative_head
    x, condition = torch.randn(5, model.config.hidden_size).double(), torch.randn(5, model.config.hidden_size).double()
    for block, module in zip(weights.head.blocks, head.mlp_blocks, strict=True):
        normed = F.layer_norm(x, x.shape[-1:], block.norm.weight, block.norm.bias, block.norm.eps)
        first = F.linear(normed, block.noise_half.weight) + F.linear(condition, block.hidden_half.weight,
                                                                     block.hidden_half.bias)  # fmt: skip
        y = F.silu(F.linear(F.silu(first), block.second.weight, block.second.bias))
        gate, up = F.linear(y, block.third.weight, block.third.bias).chunk(2, dim=-1)
        got = x + F.linear(F.silu(gate) * up, block.down.weight, block.down.bias)
        assert_rel_close(got, module(x, condition), 1e-12, "head block")
        assert block.noise_half.bias is None and block.noise_half.weight.is_contiguous()


def test_decoder_stages_and_norms():
    model = random_calm_model(seed=5, ae=dict(num_decoder_layers=4))
    decoder = ModelWeights.of(model).decoder
    assert len(decoder.layers) == 4 and decoder.stage == 2
    assert decoder.norm.bias is None and not decoder.norm.is_layer_norm
    head = ModelWeights.of(model).head
    assert head.noise_norm.is_layer_norm and head.noise_norm.bias is model.generative_head.norm_noise.bias


def test_token_llama_has_an_lm_head_and_no_calm_parts():
    model = random_token_llama(seed=6)
    weights = ModelWeights.of(model)
    assert weights.lm_head.weight is model.lm_head.weight and not weights.is_calm
    assert weights.head is None and weights.decoder is None and weights.compression is None
    assert weights.shapes.chunk_size == 1 and weights.shapes.noise == 0


def test_anything_else_is_a_type_error():
    with pytest.raises(TypeError, match="CalmModel or a TokenLlama"):
        ModelWeights.of(torch.nn.Linear(2, 2))

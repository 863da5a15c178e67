"""Random CALM models of any shape for tests, fixtures and benchmarks.

Weights follow the conformance fixture's recipe: every parameter gets Gaussian values scaled so that each block
matters (linear std 1/sqrt(fan_in), q/k projections 1.5/sqrt(fan_in), backbone embeddings 1.0, autoencoder
embedding 0.25, biases and norm parameters 0.1 around their init, the head's last linear 0.03/sqrt(fan_in)).
"""

from __future__ import annotations

import torch
from torch import nn

from calm_engine.model.calm import CalmModel
from calm_engine.model.config import AutoencoderConfig, CalmConfig, TokenLlamaConfig
from calm_engine.model.token_llama import TokenLlama

TINY_AE = dict(vocab_size=97, patch_size=4, latent_size=8, hidden_size=24, intermediate_size=40)
TINY_CALM = dict(
    vocab_size=97,
    patch_size=4,
    latent_size=8,
    noise_size=6,
    num_mlp_layers=2,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# The token-level baseline with TINY_CALM's backbone.
TINY_TOKEN_LLAMA = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


SHARED_FIELDS = ("vocab_size", "patch_size", "latent_size", "pad_token_id", "bos_token_id", "eos_token_id")


def tiny_configs(ae: dict | None = None, calm: dict | None = None, **shared) -> tuple[CalmConfig, AutoencoderConfig]:
    """Small configs; `shared` fields go to both, `ae` and `calm` override fields of one."""
    unknown = set(shared) - set(SHARED_FIELDS)
    if unknown:
        raise TypeError(f"not shared config fields: {sorted(unknown)}")
    ae_config = AutoencoderConfig(**{**TINY_AE, **shared, **(ae or {})})
    calm_config = CalmConfig(**{**TINY_CALM, **shared, **(calm or {})})
    ae_config.validate()
    calm_config.validate()
    return calm_config, ae_config


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of a CalmModel, Autoencoder or TokenLlama with the fixture recipe's random values.

    A TokenLlama's lm_head is a linear like any other; tied, it comes after the embedding and sets both."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    done = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_in = module.in_features
            scale = 1.5 if name.endswith(("q_proj", "k_proj")) else 1.0
            if name.endswith("final_layer.linears.2"):
                scale = 0.03
            module.weight.copy_(normal(module.weight.shape, scale / fan_in**0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, 0.1))
        elif isinstance(module, nn.Embedding):
            std = 0.25 if name.endswith("encoder.embed_tokens") else 1.0
            module.weight.copy_(normal(module.weight.shape, std))
        elif isinstance(module, nn.LayerNorm):
            module.weight.copy_(normal(module.weight.shape, 0.1, 1.0))
            module.bias.copy_(normal(module.bias.shape, 0.1))
        elif type(module).__name__ == "RMSNorm":
            module.weight.copy_(normal(module.weight.shape, 0.1, 1.0))
        done.update(id(p) for p in module.parameters(recurse=False))
    leftover = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not leftover, f"parameters the recipe does not cover: {leftover}"
    return model


def random_calm_model(seed: int = 0, ae: dict | None = None, calm: dict | None = None, **shared) -> CalmModel:
    calm_config, ae_config = tiny_configs(ae, calm, **shared)
    return randomize_(CalmModel(calm_config, ae_config), seed).eval().requires_grad_(False)


@torch.no_grad()
def context_sensitive_model(seed: int = 0, ae: dict | None = None, calm: dict | None = None, **shared) -> CalmModel:
    """A random model whose samples depend strongly on the context and vary with the noise.

    With the fixture recipe alone a tiny head barely sees the hidden state (latents move ~1e-3 with the context,
    ~2e-2 with the noise), so engine tests could not tell one prompt from another. Scaling the head's last linear
    (x30) and the hidden-state half of each block's first linear (x6) makes both matter, and pools of 200 samples
    still repeat patches, which temperature sampling needs.
    """
    model = random_calm_model(seed, ae, calm, **shared)
    head = model.generative_head
    head.final_layer.linears[2].weight.mul_(30)
    for block in head.mlp_blocks:
        block.linears[0].weight[:, model.config.hidden_size :].mul_(6)
    return model


def random_token_llama(seed: int = 0, **overrides) -> TokenLlama:
    """A random token-level Llama: TINY_TOKEN_LLAMA's fields with `overrides`, weights by the fixture recipe."""
    config = TokenLlamaConfig(**{**TINY_TOKEN_LLAMA, **overrides})
    config.validate()
    return randomize_(TokenLlama(config), seed).eval().requires_grad_(False)

"""The chunk autoencoder: K tokens -> one latent vector (mean, log-std) and back to K positions of logits.

Plain PyTorch, the reference for the fused kernels. Module and parameter names follow the official checkpoint
(`encoder.encoder_layers.0.mlp.gate_proj.weight`, ...), so its state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_engine.model.config import AutoencoderConfig
from calm_engine.model.layers import GatedMLP, RMSNorm


class AELayer(nn.Module):
    """Pre-RMSNorm residual gated MLP; the autoencoder has no attention."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


class Encoder(nn.Module):
    """Per-token layers, squeeze of the K positions into one vector, per-chunk layers, norm, [mean | log_std]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(config.chunk_size * config.hidden_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(config.hidden_size, 2 * config.latent_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, n*K] -> [B, n, 2*latent]."""
        batch, length = ids.shape
        chunks = length // self.config.chunk_size
        x = self.embed_tokens(ids.reshape(batch * chunks, self.config.chunk_size))
        stage = len(self.encoder_layers) // 2
        for layer in self.encoder_layers[:stage]:
            x = layer(x)
        x = self.squeeze_layer(x.reshape(batch * chunks, 1, -1))
        for layer in self.encoder_layers[stage:]:
            x = layer(x)
        return self.hidden_to_latent(self.norm(x)).reshape(batch, chunks, -1)


class Decoder(nn.Module):
    """The encoder's mirror; the output projection is the encoder's token embedding (tied, no bias)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.latent_to_hidden = nn.Linear(config.latent_size, config.hidden_size)
        self.decoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(config.hidden_size, config.chunk_size * config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied to encoder.embed_tokens.weight by Autoencoder; a checkpoint that stores a different tensor unties it.
        self.lm_head_weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))

    def hidden(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, n, latent] -> final normed hidden states [B, n*K, hidden] (before the vocab projection)."""
        batch, chunks, _ = latents.shape
        x = self.latent_to_hidden(latents)
        stage = len(self.decoder_layers) // 2
        for layer in self.decoder_layers[:stage]:
            x = layer(x)
        x = self.expand_layer(x).reshape(batch, chunks * self.config.chunk_size, -1)
        for layer in self.decoder_layers[stage:]:
            x = layer(x)
        return self.norm(x)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, n, latent] -> logits [B, n*K, vocab]."""
        return F.linear(self.hidden(latents), self.lm_head_weight)


class Autoencoder(nn.Module):
    """The public face of the autoencoder: `encode(ids) -> (mean, log_std)`, `decode(latents) -> logits`."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.decoder.lm_head_weight = self.encoder.embed_tokens.weight

    @property
    def weights_tied(self) -> bool:
        return self.decoder.lm_head_weight is self.encoder.embed_tokens.weight

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, n*K] int -> (mean, log_std), each [B, n, latent]."""
        check_token_ids(ids, self.config.vocab_size, self.config.chunk_size)
        mean, log_std = self.encoder(ids).chunk(2, dim=-1)
        return mean, log_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, n, latent] -> logits [B, n*K, vocab]."""
        self._check_latents(latents)
        return self.decoder(latents)

    def decode_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, n, latent] -> greedy token ids [B, n*K] (the autoencoder decodes by argmax)."""
        return self.decode(latents).argmax(dim=-1)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 3 or latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"latents must have shape [batch, chunks, {self.config.latent_size}], got {list(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")


def check_token_ids(ids: torch.Tensor, vocab_size: int, chunk_size: int) -> None:
    """Validate a [B, n*K] batch of token ids; names the problem instead of failing deep inside an embedding."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"token ids must be a 2-D tensor [batch, length], got {shape}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be an integer tensor (int64 or int32), got {ids.dtype}")
    if ids.shape[1] == 0 or ids.shape[1] % chunk_size:
        raise ValueError(f"token ids length {ids.shape[1]} is not a positive multiple of the chunk size K={chunk_size}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")

"""CalmModel: the autoencoder, the input compression, the Llama backbone and the energy head wired together.

This is the reference model API (no sampling policy here):
    hidden = model.hidden_states(ids)               # [B, n*K] ids -> [B, n, hidden]
    latent = model.sample_latent(hidden[:, -1], u)  # u uniform on [-0.5, 0.5), [B, noise_size] -> [B, latent]
    ids = model.autoencoder.decode_ids(latent[:, None])  # -> the next K tokens [B, K]
"""

from __future__ import annotations

import torch
from torch import nn

from calm_engine.model.autoencoder import Autoencoder, check_token_ids
from calm_engine.model.compression import InputCompression
from calm_engine.model.config import AutoencoderConfig, CalmConfig
from calm_engine.model.energy_head import EnergyHead
from calm_engine.model.llama import KVCache, LlamaBackbone


def check_backbone_input(config, ids: torch.Tensor, cache: KVCache | None) -> None:
    """Chunk-aligned ids [B, n*K] that fit the model's context and, if given, the cache they continue."""
    check_token_ids(ids, config.vocab_size, config.chunk_size)
    chunks = ids.shape[1] // config.chunk_size
    start = 0 if cache is None else cache.length
    if start + chunks > config.max_chunks:
        raise ValueError(
            f"{start + chunks} chunks exceed the model's context of {config.max_chunks} chunks "
            f"({config.max_chunks * config.chunk_size} tokens)"
        )
    if cache is not None:
        if cache.batch_size != ids.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} sequences but ids has {ids.shape[0]} rows")
        if start + chunks > cache.capacity:
            raise ValueError(f"{start + chunks} chunks exceed the cache capacity of {cache.capacity}")


class CalmModel(nn.Module):
    def __init__(self, config: CalmConfig, ae_config: AutoencoderConfig):
        super().__init__()
        config.check_autoencoder(ae_config)
        self.config = config
        self.autoencoder = Autoencoder(ae_config)
        self.backbone = LlamaBackbone(config)
        self.embed_proj = InputCompression(config)
        self.generative_head = EnergyHead(config)
        self.tokenizer = None  # set by the loader when the checkpoint has one

    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm.weight.dtype

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, n*K] -> backbone inputs [B, n, hidden]: each chunk's K embeddings concatenated and compressed."""
        batch, length = ids.shape
        chunks = length // self.config.chunk_size
        return self.embed_proj(self.backbone.embed_tokens(ids).reshape(batch, chunks, -1))

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `capacity` chunks (default: the model's context)."""
        capacity = self.config.max_chunks if capacity is None else capacity
        if not 0 < capacity <= self.config.max_chunks:
            raise ValueError(f"cache capacity must be in [1, {self.config.max_chunks}] chunks, got {capacity}")
        return KVCache(self.config, batch_size, capacity, self.device, self.dtype)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Backbone output for chunk-aligned ids [B, n*K] -> [B, n, hidden].

        With a cache the ids continue the cached sequences (positions start at cache.length) and are appended.
        """
        check_backbone_input(self.config, ids, cache)
        return self.backbone(self.compress(ids), cache)

    def sample_latent(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] + noise [..., noise_size] uniform on [-0.5, 0.5) -> latent [..., latent_size]."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden must end in {self.config.hidden_size}, got shape {list(hidden.shape)}")
        if noise.shape[-1] != self.config.noise_size or noise.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(
                f"noise must have shape {[*hidden.shape[:-1], self.config.noise_size]} to match hidden, "
                f"got {list(noise.shape)}"
            )
        return self.generative_head(hidden, noise.to(hidden.dtype))

    def encode_text(self, text: str) -> tuple[torch.Tensor, int]:
        """text -> (posterior means [n, latent] of its chunks, its number of tokens).

        A partial last chunk is padded with the pad id; the autoencoder need not reconstruct pads as pads (the
        default model's does not), so give the token count to decode_text to get the text back without them."""
        ids = self._require_tokenizer().encode(text)
        pad = -len(ids) % self.config.chunk_size
        if pad and self.config.pad_token_id is None:
            raise ValueError(
                f"text has {len(ids)} tokens, not a multiple of K={self.config.chunk_size}, and the config has no "
                "pad_token_id to fill the last chunk"
            )
        padded = torch.tensor([ids + [self.config.pad_token_id] * pad], device=self.device)
        mean, _ = self.autoencoder.encode(padded)
        return mean[0], len(ids)

    def decode_text(self, latents: torch.Tensor, num_tokens: int | None = None) -> str:
        """latents [n, latent] -> text: greedy decode of every chunk, cut to the first `num_tokens` ids (those of
        the encoded text, when it came from encode_text), pad ids dropped."""
        if num_tokens is not None and (
            isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 <= num_tokens
        ):
            raise ValueError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
        ids = self.autoencoder.decode_ids(latents[None])[0].tolist()[:num_tokens]
        return self._require_tokenizer().decode([i for i in ids if i != self.config.pad_token_id])

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with tokenizer=<dir> or put one in the checkpoint")
        return self.tokenizer

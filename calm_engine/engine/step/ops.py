"""The operations the PyTorch step runs, in two implementations chosen once per engine: plain PyTorch (TorchOps, any
device) and the Triton kernels (TritonOps: CUDA, or CPU under TRITON_INTERPRET=1 in tests).

Each kernel's torch reference (`<op>_ref` beside it in kernels/) is what TorchOps runs, so every formula exists once.
The step (torch_step.py, backbone.py) calls these methods and never asks which implementation it has.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_engine.engine.noise import NoiseFn, philox_noise
from calm_engine.engine.weights import Compression, Decoder, EnergyHead
from calm_engine.kernels.ae_decode import decode_argmax, decode_argmax_ref
from calm_engine.kernels.ae_encode import compress, compress_ref
from calm_engine.kernels.decode_attention import decode_attention
from calm_engine.kernels.energy_head import energy_head, energy_head_ref


@dataclass(frozen=True)
class DecodeAttention:
    """One decode step's attention metadata, made once per step and read by every layer.

    slots [B]: each row's cache slot. attend: keys read per row (at least the longest row's length; the CUDA graph
    passes the capacity). first_slot: where the rows' slots are first_slot, first_slot + 1, ..., the PyTorch path
    reads the cache through a view, with no gather. mask [B, 1, 1, attend]: the PyTorch path's key mask. lengths [B]:
    the keys each row reads (the kernel's bound per row).
    """

    slots: torch.Tensor
    attend: int
    first_slot: int | None = None
    mask: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


class TorchOps:
    """Plain PyTorch: scaled_dot_product_attention over the rows' cache, the kernels' references elsewhere."""

    name = "PyTorch"

    def compress(self, compression: Compression, embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """ids [M, K] -> backbone inputs [M, hidden]."""
        return compress_ref(compression, embed, ids)

    def head(
        self, head: EnergyHead, hidden: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, samples: int,
        noise: NoiseFn,
    ) -> torch.Tensor:  # fmt: skip
        """hidden [B, H] -> latents [B, samples, latent] with the noise of (seed, counter)."""
        return energy_head_ref(head, hidden, noise(seeds, counters, samples, head.noise_embed.in_features))

    def decode_argmax(self, decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
        """latents [M, latent] -> greedy ids [M, K]."""
        return self.decode_argmax_max(decoder, latents)[0]

    def decode_argmax_max(self, decoder: Decoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [M, latent] -> (greedy ids [M, K], their logits [M, K]): what a vocabulary shard reports."""
        return decode_argmax_ref(decoder, latents)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of an output projection's partial results over tensor-parallel ranks: one rank has them all."""
        return partial

    def decode_attention_metadata(
        self, positions: torch.Tensor, slots: torch.Tensor, attend: int, first_slot: int | None
    ) -> DecodeAttention:
        mask = (torch.arange(attend, device=positions.device)[None] <= positions[:, None])[:, None, None]
        return DecodeAttention(slots, attend, first_slot, mask=mask)

    def decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: DecodeAttention
    ) -> torch.Tensor:
        """q [B, H, D], one layer's cache keys/values [slots + 1, KVH, C, D] -> [B, H * D]."""
        if meta.first_slot is None:
            past_keys, past_values = keys[:, :, : meta.attend][meta.slots], values[:, :, : meta.attend][meta.slots]
        else:
            rows = slice(meta.first_slot, meta.first_slot + q.shape[0])
            past_keys, past_values = keys[rows, :, : meta.attend], values[rows, :, : meta.attend]
        out = F.scaled_dot_product_attention(
            q[:, :, None], past_keys, past_values, attn_mask=meta.mask, enable_gqa=True
        )
        return out.reshape(q.shape[0], -1)


class TritonOps(TorchOps):
    """The fused Triton kernels (kernels/). Decode attention reads each row's own length: no mask, no gather, and the
    launch is the same whatever the lengths, so a CUDA graph captures it."""

    name = "Triton"

    def compress(self, compression: Compression, embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return compress(compression, embed, ids)

    def head(
        self, head: EnergyHead, hidden: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, samples: int,
        noise: NoiseFn,
    ) -> torch.Tensor:  # fmt: skip
        if noise is not philox_noise:  # another noise source (tests, recorded noise) is drawn outside the kernel
            return super().head(head, hidden, seeds, counters, samples, noise)
        return energy_head(head, hidden, seeds, counters, samples)  # the same Philox noise, drawn in the kernel

    def decode_argmax_max(self, decoder: Decoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_argmax(decoder, latents)

    def decode_attention_metadata(
        self, positions: torch.Tensor, slots: torch.Tensor, attend: int, first_slot: int | None
    ) -> DecodeAttention:
        return DecodeAttention(slots, attend, first_slot, lengths=positions + 1)

    def decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: DecodeAttention
    ) -> torch.Tensor:
        out = decode_attention(q.contiguous(), keys, values, meta.slots, meta.lengths, q.shape[-1] ** -0.5)
        return out.reshape(q.shape[0], -1)


def ops_for(use_kernels: bool) -> TorchOps:
    """TritonOps where use_kernels, else TorchOps. A launch where triton cannot run (CPU tensors without
    TRITON_INTERPRET=1) is refused by the kernel with the fix named (kernels/utils.check_launch)."""
    if use_kernels and importlib.util.find_spec("triton") is None:
        raise ValueError("use_kernels=True needs triton (pip install triton==3.6.0 on Linux)")
    return TritonOps() if use_kernels else TorchOps()

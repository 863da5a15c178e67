"""Autoencoder encode (ids -> mean, log_std) and the input compression (ids -> one backbone input vector).

Fused: RMSNorms and LayerNorm inputs in GEMM prologues, SwiGLU gating and residuals in epilogues, and for
`compress` the K-token embedding gather inside the first GEMM's loads, so the [M, K*H] concatenation is never built.
"""

from __future__ import annotations

import torch

from . import reference
from .fused_linear import fused_linear, residual_gated_mlp
from .utils import check_fields, check_float, check_int, check_launch, check_silu, jit, next_pow2, num_warps_for, tl

ENCODER_FIELDS = ("embed", "layers", "squeeze", "norm", "to_latent")
COMPRESSION_FIELDS = ("first", "second", "norm")


@jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, stride_xm, stride_om, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def _check_ids(name: str, ids: torch.Tensor, patch: int, vocab: int) -> None:
    if ids.dim() != 2 or ids.shape[1] != patch:
        raise ValueError(f"{name}: ids must be [M, K={patch}], got {list(ids.shape)}")
    check_int(name, "ids", ids, tuple(ids.shape))
    # Range checks need a host sync; the engine validates ids on the host before they reach the device.
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name}: ids must lie in [0, {vocab})")


def _encoder_sizes(encoder) -> tuple[int, int]:
    """(K, latent) of an encoder description: the squeeze reads K token vectors, to_latent gives mean and log-std."""
    check_fields("ae_encode", "encoder", encoder, "Encoder", ENCODER_FIELDS)
    return encoder.squeeze.weight.shape[1] // encoder.embed.shape[1], encoder.to_latent.weight.shape[0] // 2


def ae_encode(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [M, K] -> (mean, log_std), each [M, latent] (views of one [M, 2*latent] output).

    encoder: its weights as calm_engine.engine.weights.Encoder describes them.
    Launches: the embedding gather (one torch index_select: 1 KB per token, small next to the layers' GEMMs, and
    its rows are also the first residual), 2 per AE layer, the squeeze linear, to_latent with the final RMSNorm in
    its prologue. Floors at CALM-M for a 4k-token prompt (M = 1024 chunks, bf16): FLOPs 2 * 1024 *
    (4 * 3 * 0.66 M + 1.05 M + 3 * 0.66 M + 0.13 M) = 22.4 GFLOP / 990 TFLOP/s = 23 us; weights 11 MB + activations
    about 20 MB / 4.8 TB/s = 6.5 us: compute binds.
    """
    k, latent = _encoder_sizes(encoder)
    check_silu("ae_encode", [layer.mlp for layer in encoder.layers])
    table = encoder.embed
    _check_ids("ae_encode", ids, k, table.shape[0])
    check_float("ae_encode", "embedding", table)
    if ids.device != table.device:
        raise ValueError(f"ae_encode: ids on {ids.device} but the encoder on {table.device}")
    check_launch(_layer_norm_kernel, "ae_encode", ids, table)
    m = ids.shape[0]
    x = table.index_select(0, ids.reshape(-1))  # [M*K, hidden]
    stage = len(encoder.layers) // 2
    for layer in encoder.layers[:stage]:
        residual_gated_mlp(x, layer)
    x = fused_linear(x.view(m, -1), encoder.squeeze.weight, encoder.squeeze.bias)
    for layer in encoder.layers[stage:]:
        residual_gated_mlp(x, layer)
    out = fused_linear(
        x, encoder.to_latent.weight, encoder.to_latent.bias, norm="rms", norm_weight=encoder.norm.weight,
        eps=encoder.norm.eps,
    )  # fmt: skip
    return out[:, :latent], out[:, latent:]


def ae_encode_ref(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ae_encode` in plain torch, as the model's Encoder computes it: ids [M, K] -> (mean, log_std) [M, latent]."""
    k, latent = _encoder_sizes(encoder)
    _check_ids("ae_encode_ref", ids, k, encoder.embed.shape[0])
    m = ids.shape[0]
    x = torch.nn.functional.embedding(ids, encoder.embed)  # [M, K, hidden]
    stage = len(encoder.layers) // 2
    for layer in encoder.layers[:stage]:
        x = reference.residual_mlp(x, layer)
    x = reference.linear(x.reshape(m, -1), encoder.squeeze)
    for layer in encoder.layers[stage:]:
        x = reference.residual_mlp(x, layer)
    out = reference.linear(reference.norm(x, encoder.norm), encoder.to_latent)
    return out[:, :latent], out[:, latent:]


def compress(compression, embed: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ids [M, K] -> LayerNorm(W2 SiLU(W1 [E[ids_0] | ... | E[ids_K-1]] + b1) + b2), [M, H] (CALM.md 1.2).

    compression: its weights as calm_engine.engine.weights.Compression describes them; embed [V, H] the backbone's
    token embedding. Launches: gather + Linear(K*H -> 2H) + SiLU (the gather happens in the GEMM's A loads),
    Linear(2H -> H), LayerNorm (a row kernel: the LN needs whole rows, which a column-tiled GEMM epilogue does not
    have). Floors at CALM-M, M = 64 decode rows, bf16: weights (4096 x 2048 + 2048 x 1024) x 2 B = 21 MB / 4.8 TB/s
    = 4.4 us; FLOPs 2 * 64 * 10.5 M = 1.3 GFLOP / 990 TFLOP/s = 1.4 us: memory binds up to M of about 200.
    """
    check_fields("compress", "compression", compression, "Compression", COMPRESSION_FIELDS)
    first, second, norm = compression.first, compression.second, compression.norm
    hidden = second.weight.shape[0]
    if embed.dim() != 2 or embed.shape[1] != hidden or embed.stride(1) != 1:
        raise ValueError(f"compress: embed must be [V, {hidden}] with unit column stride")
    _check_ids("compress", ids, first.weight.shape[1] // hidden, embed.shape[0])
    check_float("compress", "embed", embed)
    if out is None:
        out = torch.empty(ids.shape[0], hidden, device=embed.device, dtype=embed.dtype)
    if out.shape != (ids.shape[0], hidden) or not out.is_contiguous():
        raise ValueError(f"compress: out must be a contiguous [{ids.shape[0]}, {hidden}] tensor")
    if ids.shape[0] == 0:
        return out
    check_launch(_layer_norm_kernel, "compress", ids, embed, out)
    t = fused_linear(embed, first.weight, first.bias, gather_ids=ids, activation="silu")
    y = fused_linear(t, second.weight, second.bias)
    block = next_pow2(hidden)
    _layer_norm_kernel[(ids.shape[0],)](
        y, norm.weight, norm.bias, out, hidden, y.stride(0), out.stride(0), norm.eps, BLOCK=block,
        num_warps=num_warps_for(block),
    )  # fmt: skip
    return out


def compress_ref(compression, embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`compress` in plain torch (CalmModel.compress for one chunk per row): ids [M, K] -> [M, H]."""
    x = torch.nn.functional.embedding(ids, embed).reshape(ids.shape[0], -1)
    x = torch.nn.functional.silu(reference.linear(x, compression.first))
    return reference.norm(reference.linear(x, compression.second), compression.norm)

"""Autoencoder encode (ids -> mean, log_std) and the input compression (ids -> one backbone input vector).

Fused: RMSNorms and LayerNorm inputs in GEMM prologues, SwiGLU gating and residuals in epilogues, and for
`compress` the K-token embedding gather inside the first GEMM's loads, so the [M, K*H] concatenation is never built.
"""

from __future__ import annotations

import torch

from calm_engine.model.autoencoder import Encoder
from calm_engine.model.compression import InputCompression
from kernels.ae_decode import _ae_layer, check_activation
from kernels.fused_linear import _fused_linear_kernel, fused_linear
from kernels.utils import check_float, check_int, check_launch, jit, next_pow2, num_warps_for, tl


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


def ae_encode(encoder: Encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [M, K] -> (mean, log_std), each [M, latent] (views of one [M, 2*latent] output).

    Launches: the embedding gather (one torch index_select: 1 KB per token, small next to the layers' GEMMs, and
    its rows are also the first residual), 2 per AE layer, the squeeze linear, hidden_to_latent with the final
    RMSNorm in its prologue. Floors at CALM-M for a 4k-token prompt (M = 1024 chunks, bf16): FLOPs 2 * 1024 *
    (4 * 3 * 0.66 M + 1.05 M + 3 * 0.66 M + 0.13 M) = 22.4 GFLOP / 990 TFLOP/s = 23 us; weights 11 MB + activations
    about 20 MB / 4.8 TB/s = 6.5 us: compute binds.
    """
    if not isinstance(encoder, Encoder):
        raise ValueError(f"ae_encode: encoder must be an Encoder, got {type(encoder).__name__}")
    config = encoder.config
    check_activation(config, "ae_encode")
    _check_ids("ae_encode", ids, config.patch_size, config.vocab_size)
    table = encoder.embed_tokens.weight
    check_float("ae_encode", "embedding", table)
    if ids.device != table.device:
        raise ValueError(f"ae_encode: ids on {ids.device} but the encoder on {table.device}")
    check_launch(_fused_linear_kernel, "ae_encode", ids, table)
    m = ids.shape[0]
    x = table.index_select(0, ids.reshape(-1))  # [M*K, hidden]
    stage = len(encoder.encoder_layers) // 2
    for layer in encoder.encoder_layers[:stage]:
        _ae_layer(layer, x)
    x = fused_linear(x.view(m, -1), encoder.squeeze_layer.weight, encoder.squeeze_layer.bias)
    for layer in encoder.encoder_layers[stage:]:
        _ae_layer(layer, x)
    out = fused_linear(
        x, encoder.hidden_to_latent.weight, encoder.hidden_to_latent.bias, norm="rms",
        norm_weight=encoder.norm.weight, eps=encoder.norm.eps,
    )  # fmt: skip
    return out[:, : config.latent_size], out[:, config.latent_size :]


def ae_encode_ref(encoder: Encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's encoder on ids [M, K] -> (mean, log_std) [M, latent]."""
    _check_ids("ae_encode_ref", ids, encoder.config.patch_size, encoder.config.vocab_size)
    mean, log_std = encoder(ids.reshape(1, -1))[0].chunk(2, dim=-1)
    return mean, log_std


def compress(
    embed_proj: InputCompression, embed_weight: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ids [M, K] -> LayerNorm(W2 SiLU(W1 [E[ids_0] | ... | E[ids_K-1]] + b1) + b2), [M, H] (CALM.md 1.2).

    Launches: gather + Linear(K*H -> 2H) + SiLU (the gather happens in the GEMM's A loads), Linear(2H -> H),
    LayerNorm (a row kernel: the LN needs whole rows, which a column-tiled GEMM epilogue does not have).
    Floors at CALM-M, M = 64 decode rows, bf16: weights (4096 x 2048 + 2048 x 1024) x 2 B = 21 MB / 4.8 TB/s
    = 4.4 us; FLOPs 2 * 64 * 10.5 M = 1.3 GFLOP / 990 TFLOP/s = 1.4 us: memory binds up to M of about 200.
    """
    first, second, norm = embed_proj[0], embed_proj[2], embed_proj[3]
    hidden = second.out_features
    if not isinstance(embed_proj, InputCompression):
        raise ValueError(f"compress: embed_proj must be an InputCompression, got {type(embed_proj).__name__}")
    if embed_weight.dim() != 2 or embed_weight.shape[1] != hidden or embed_weight.stride(1) != 1:
        raise ValueError(f"compress: embed_weight must be [V, {hidden}] with unit column stride")
    patch = first.in_features // hidden
    _check_ids("compress", ids, patch, embed_weight.shape[0])
    check_float("compress", "embed_weight", embed_weight)
    if out is None:
        out = torch.empty(ids.shape[0], hidden, device=embed_weight.device, dtype=embed_weight.dtype)
    if out.shape != (ids.shape[0], hidden) or not out.is_contiguous():
        raise ValueError(f"compress: out must be a contiguous [{ids.shape[0]}, {hidden}] tensor")
    if ids.shape[0] == 0:
        return out
    check_launch(_layer_norm_kernel, "compress", ids, embed_weight, out)
    t = fused_linear(embed_weight, first.weight, first.bias, gather_ids=ids, activation="silu")
    y = fused_linear(t, second.weight, second.bias)
    block = next_pow2(hidden)
    _layer_norm_kernel[(ids.shape[0],)](
        y, norm.weight, norm.bias, out, hidden, y.stride(0), out.stride(0), norm.eps, BLOCK=block,
        num_warps=num_warps_for(block),
    )  # fmt: skip
    return out


def compress_ref(embed_proj: InputCompression, embed_weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CalmModel.compress for one chunk per row: embed_proj(E[ids].reshape(M, K*H))."""
    return embed_proj(torch.nn.functional.embedding(ids, embed_weight).reshape(ids.shape[0], -1))

"""Autoencoder decode to greedy ids: decoder MLPs, then the tied vocabulary projection fused with a streaming argmax.

The [M*K, V] logits (V = 128,256) are never written: each program keeps a running (max, first argmax) over its
share of the vocabulary, and a small second kernel reduces the shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .fused_linear import fused_linear, residual_gated_mlp
from .rms_norm import rms_norm
from .utils import (
    check_fields,
    check_float,
    check_launch,
    check_silu,
    check_tile,
    dot_depth,
    dot_precision,
    jit,
    next_pow2,
    tl,
)

DECODER_FIELDS = ("latent_to_hidden", "layers", "expand", "norm", "projection")
BLOCK_V = 128
TARGET_PROGRAMS = 4 * 132  # about four programs per SM of an H100/H200: enough to hide the tile loop's latency
REDUCE_BLOCK_M = 32
REDUCE_BLOCK_S = 32


@jit(do_not_specialize=("M", "tiles_per_split"))
def _argmax_projection_kernel(
    h_ptr, e_ptr, part_val_ptr, part_idx_ptr, M, V, D, stride_hm, stride_ev, tiles_per_split,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Running max and first argmax of h @ E^T over vocabulary tiles [split * tiles_per_split, ...)."""
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    ds = tl.arange(0, BLOCK_D)
    best_val = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for tile in range(0, tiles_per_split):
        cols = (split * tiles_per_split + tile) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_mask = d0 + ds < D
            h_mask = row_mask[:, None] & d_mask[None, :]
            h = tl.load(h_ptr + rows[:, None] * stride_hm + (d0 + ds)[None, :], mask=h_mask, other=0.0)
            e = tl.load(
                e_ptr + cols[None, :].to(tl.int64) * stride_ev + (d0 + ds)[:, None],
                mask=d_mask[:, None] & v_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(h, e, acc, input_precision=PRECISION)
        acc = tl.where(v_mask[None, :], acc, float("-inf"))
        tile_max = tl.max(acc, axis=1)
        # First index among the tile's maxima; a later tile must be strictly larger to win (torch.argmax ties).
        tile_arg = tl.min(tl.where(acc == tile_max[:, None], cols[None, :], V), axis=1)
        better = tile_max > best_val
        best_idx = tl.where(better, tile_arg, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    tl.store(part_val_ptr + split * M + rows, best_val, mask=row_mask)
    tl.store(part_idx_ptr + split * M + rows, best_idx, mask=row_mask)


@jit(do_not_specialize=("M", "SPLITS"))
def _argmax_reduce_kernel(
    part_val_ptr, part_idx_ptr, val_ptr, idx_ptr, M, SPLITS, V, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr
):  # fmt: skip
    """Max and first argmax over the splits' partial results [SPLITS, M], BLOCK_S splits per step."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    s = tl.arange(0, BLOCK_S)
    best_val = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], V, dtype=tl.int32)
    for s0 in range(0, SPLITS, BLOCK_S):
        mask = row_mask[:, None] & (s0 + s < SPLITS)[None, :]
        offs = (s0 + s)[None, :].to(tl.int64) * M + rows[:, None]
        vals = tl.load(part_val_ptr + offs, mask=mask, other=float("-inf"))
        idx = tl.load(part_idx_ptr + offs, mask=mask, other=V)
        step_val = tl.max(vals, axis=1)
        step_idx = tl.min(tl.where(vals == step_val[:, None], idx, V), axis=1)
        # Ties go to the smallest index, torch.argmax's choice, whichever split step they come from.
        better = (step_val > best_val) | ((step_val == best_val) & (step_idx < best_idx))
        best_idx = tl.where(better, step_idx, best_idx)
        best_val = tl.where(better, step_val, best_val)
    tl.store(val_ptr + rows, best_val, mask=row_mask)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)


def project_argmax(
    h: torch.Tensor, embedding: torch.Tensor, splits: int | None = None, block_m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, D] (already normed), embedding [V, D] -> (argmax ids int64 [M], max logit float32 [M]) of h @ E^T, the
    first index on ties; the logits are never written (a running max over vocabulary tiles, then over splits)."""
    m, d = h.shape
    v = embedding.shape[0]
    # fp32 runs IEEE dots on FMA units, whose operands live in registers: 64-row x 128-column tiles spilled 24 B
    # (sm_90), 64 x 64 over 3 stages 8-48 B; 32 x 64 over 2 stages none on sm_80 and sm_90.
    fp32 = h.dtype == torch.float32
    block_v, stages = (BLOCK_V // 2, 2) if fp32 else (BLOCK_V, 3)
    if block_m is None:
        block_m = min(32 if fp32 else 64, max(16, next_pow2(m)))
    check_tile("project_argmax", "block_m", block_m)
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"project_argmax: splits must be a positive int, got {splits!r}")
    ids = torch.empty(m, device=h.device, dtype=torch.int64)
    val = torch.empty(m, device=h.device, dtype=torch.float32)
    if m == 0:
        return ids, val
    check_launch(_argmax_projection_kernel, "decode_argmax", h, embedding)
    row_tiles, v_tiles = -(-m // block_m), -(-v // block_v)
    if splits is None:
        splits = max(1, min(v_tiles, -(-TARGET_PROGRAMS // row_tiles)))
    tiles_per_split = -(-v_tiles // splits)
    splits = -(-v_tiles // tiles_per_split)
    part_val = torch.empty(splits, m, device=h.device, dtype=torch.float32)
    part_idx = torch.empty(splits, m, device=h.device, dtype=torch.int32)
    _argmax_projection_kernel[(row_tiles, splits)](
        h, embedding, part_val, part_idx, m, v, d, h.stride(0), embedding.stride(0), tiles_per_split,
        PRECISION=dot_precision(h.dtype), BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=dot_depth(h.dtype), num_warps=8,
        num_stages=stages,
    )  # fmt: skip
    # Rows x splits per step: a [32, 32] tile over 4 warps is 8 partials per thread, whatever the split count (one
    # [32, 512] tile on one warp at batch 1 spilled 20 KB and took 9-21 s to compile).
    _argmax_reduce_kernel[(-(-m // REDUCE_BLOCK_M),)](
        part_val, part_idx, val, ids, m, splits, v, BLOCK_M=REDUCE_BLOCK_M, BLOCK_S=REDUCE_BLOCK_S, num_warps=4
    )
    return ids, val


# The PyTorch decode holds at most this many logits at once (16 MB in float32), in blocks of ROW_BLOCK decoded rows.
MAX_BLOCK_LOGITS = 1 << 22
ROW_BLOCK = 1024


def project_argmax_ref(h: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`project_argmax` in plain torch, holding at most MAX_BLOCK_LOGITS logits at once: (ids int64 [M], max [M]).

    Small products run whole. Large ones (a 200-sample pool: M = 800 rows per request) run in blocks of ROW_BLOCK
    rows x a vocabulary slice, keeping a running maximum: blocking rows alone would re-read the whole [V, D] matrix
    (263 MB at CALM-M) for every few rows. A later slice wins only when strictly larger, so ties keep the first index,
    as torch.argmax does. The max is in h's dtype.
    """
    rows, vocab = h.shape[0], embedding.shape[0]
    if rows * vocab <= MAX_BLOCK_LOGITS:
        logits = F.linear(h, embedding)
        ids = reference.first_argmax(logits)
        return ids, logits.gather(-1, ids[:, None])[:, 0]
    row_block = min(rows, ROW_BLOCK)
    vocab_block = max(1, MAX_BLOCK_LOGITS // row_block)
    ids, values = [], []
    for part in h.split(row_block):
        best_value = best_index = None
        for start in range(0, vocab, vocab_block):
            value, index = reference.max_first_argmax(F.linear(part, embedding[start : start + vocab_block]))
            if best_value is None:
                best_value, best_index = value, index
            else:
                better = value > best_value
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index + start, best_index)
        ids.append(best_index)
        values.append(best_value)
    return torch.cat(ids), torch.cat(values)


def _check(decoder, latents: torch.Tensor) -> None:
    check_fields("decode_argmax", "decoder", decoder, "Decoder", DECODER_FIELDS)
    size = decoder.latent_to_hidden.weight.shape[1]
    if latents.dim() != 2 or latents.shape[1] != size:
        raise ValueError(f"decode_argmax: latents must be [M, {size}], got {list(latents.shape)}")
    if latents.dtype != decoder.projection.dtype:
        raise ValueError(f"decode_argmax: latents are {latents.dtype}, the decoder {decoder.projection.dtype}")


def chunk_size(decoder) -> int:
    """K: the decoder expands one latent's hidden vector into K token positions."""
    return decoder.expand.weight.shape[0] // decoder.latent_to_hidden.weight.shape[0]


def decode_argmax(decoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """latents [M, latent] -> (ids int64 [M, K], max_logit float32 [M, K]): the greedy decode of each latent.

    decoder: its weights as calm_engine.engine.weights.Decoder describes them.
    Launches: latent_to_hidden; 2 per AE layer (RMSNorm in the gate/up prologue, SwiGLU epilogue; down + residual);
    expand; the final RMSNorm; projection + running argmax over the tied embedding; the reduction over splits.
    Floors at CALM-M, M = 200 samples (M*K = 800 rows), bf16: the projection is 2 * 800 * 128256 * 512
    = 105 GFLOP / 990 TFLOP/s = 106 us, its 131 MB embedding / 4.8 TB/s = 27 us: compute binds above about
    M = 50; the MLPs add 2 * 200 * (0.07 + 4 * 2 * 0.66 + 1.05) M = 2.3 GFLOP. Unfused, the logits alone would be
    800 x 128256 x 2 B = 205 MB written and read back.
    """
    _check(decoder, latents)
    check_float("decode_argmax", "latents", latents)
    check_silu("decode_argmax", [layer.mlp for layer in decoder.layers])
    k, stage = chunk_size(decoder), len(decoder.layers) // 2
    x = fused_linear(latents.contiguous(), decoder.latent_to_hidden.weight, decoder.latent_to_hidden.bias)
    for layer in decoder.layers[:stage]:
        residual_gated_mlp(x, layer)
    x = fused_linear(x, decoder.expand.weight, decoder.expand.bias).view(-1, x.shape[1])
    for layer in decoder.layers[stage:]:
        residual_gated_mlp(x, layer)
    h = rms_norm(x, decoder.norm.weight, decoder.norm.eps)
    ids, val = project_argmax(h, decoder.projection)
    return ids.view(-1, k), val.view(-1, k)


def decode_argmax_ref(decoder, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_argmax` in plain torch: the model's Decoder, its vocabulary projection through project_argmax_ref.
    (ids int64 [M, K], max logit [M, K]). A large pool runs in blocks of ROW_BLOCK decoded rows, so neither its logits
    nor its decoder activations ever exist at once: a step's memory grows with its samples only by their noise, head
    activations and ids (llm_engine.sample_row_bytes, decode_block_bytes)."""
    _check(decoder, latents)
    k = chunk_size(decoder)
    block = max(1, ROW_BLOCK // k)
    if latents.shape[0] <= block:
        return _decode_argmax_block(decoder, latents, k)
    # Each block's results go straight into outputs allocated up front: small survivors allocated between the blocks'
    # large temporaries fragment the heap, which then keeps growing (measured: 6 KB per sample at 80,000 samples).
    ids = torch.empty(latents.shape[0], k, dtype=torch.int64, device=latents.device)
    values = torch.empty(latents.shape[0], k, dtype=latents.dtype, device=latents.device)
    for start in range(0, latents.shape[0], block):
        part_ids, part_values = _decode_argmax_block(decoder, latents[start : start + block], k)
        ids[start : start + block], values[start : start + block] = part_ids, part_values
    return ids, values


def _decode_argmax_block(decoder, latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    stage, rows = len(decoder.layers) // 2, latents.shape[0]
    x = reference.linear(latents, decoder.latent_to_hidden)
    for layer in decoder.layers[:stage]:
        x = reference.residual_mlp(x, layer)
    x = reference.linear(x, decoder.expand).reshape(rows * k, -1)
    for layer in decoder.layers[stage:]:
        x = reference.residual_mlp(x, layer)
    ids, values = project_argmax_ref(reference.norm(x, decoder.norm), decoder.projection)
    return ids.view(rows, k), values.view(rows, k)

"""The energy generative head (CALM.md 1.3) as fused launches with in-kernel Philox noise: hidden rows -> samples.

Fusion: the noise is generated inside the noise-embedding kernel (never written), LayerNorms run as GEMM prologues,
SiLU/gating/biases/residuals as GEMM epilogues, and the hidden-state path (hidden_embd, its LayerNorm and the
condition half of each block's first linear) runs once per row and enters the per-sample GEMM as a row bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .fused_linear import fused_linear
from .philox import philox_uniform
from .utils import check_fields, check_float, check_int, check_launch, dot_precision, dot_warps, jit, next_pow2, tl

HEAD_FIELDS = ("hidden_embed", "hidden_norm", "noise_embed", "noise_norm", "blocks", "final_norm", "final_first",
               "final_second")  # fmt: skip


@jit
def _embed_tile(noise, w_ptr, b_ptr, cols, n_mask, j, j_mask, stride_wn, PRECISION: tl.constexpr):
    """noise [BLOCK_M, NOISE_P2] @ W[cols, :NOISE]^T + b[cols] in float32; masked weights are zeros (never NaN)."""
    w = tl.load(w_ptr + cols[None, :] * stride_wn + j[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0.0)
    bias = tl.load(b_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
    return tl.dot(noise, w, input_precision=PRECISION) + bias[None, :]


@jit(do_not_specialize=("M", "samples"))
def _noise_embed_kernel(
    seeds_ptr, steps_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, out_ptr,
    M, samples, H, NOISE, stride_wn, stride_om, eps,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NOISE_P2: tl.constexpr,
):  # fmt: skip
    """x0[m] = LayerNorm(noise_embd(eps[m])) for rows m = r * samples + s, eps generated here from (seed, step)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    request = rows // samples
    sample = rows % samples
    seed = tl.load(seeds_ptr + request, mask=row_mask, other=0)
    step = tl.load(steps_ptr + request, mask=row_mask, other=0).to(tl.int64)
    j = tl.arange(0, NOISE_P2)
    j_mask = j < NOISE
    counter = (sample[:, None] * NOISE + j[None, :]).to(tl.int32)
    noise = philox_uniform(seed[:, None], step[:, None], counter)
    noise = tl.where(j_mask[None, :], noise, 0.0).to(w_ptr.dtype.element_ty)
    cols = tl.arange(0, BLOCK_N)

    # The K=NOISE GEMM is cheap (64 deep), so it is recomputed in each of the three LayerNorm passes rather than
    # written and re-read: mean, centred second moment, then normalise and store.
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, H, BLOCK_N):
        n_mask = n0 + cols < H
        z = _embed_tile(noise, w_ptr, b_ptr, n0 + cols, n_mask, j, j_mask, stride_wn, PRECISION)
        total += tl.sum(tl.where(n_mask[None, :], z, 0.0), axis=1)
    mean = total / H
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, H, BLOCK_N):
        n_mask = n0 + cols < H
        z = _embed_tile(noise, w_ptr, b_ptr, n0 + cols, n_mask, j, j_mask, stride_wn, PRECISION)
        centred = tl.where(n_mask[None, :], z - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(squares / H + eps)
    for n0 in range(0, H, BLOCK_N):
        n_mask = n0 + cols < H
        z = _embed_tile(noise, w_ptr, b_ptr, n0 + cols, n_mask, j, j_mask, stride_wn, PRECISION)
        lnw = tl.load(lnw_ptr + n0 + cols, mask=n_mask, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + n0 + cols, mask=n_mask, other=0.0).to(tl.float32)
        y = (z - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
        ptrs = out_ptr + rows[:, None] * stride_om + (n0 + cols)[None, :]
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _check(head, hidden: torch.Tensor, samples: int) -> None:
    check_fields("energy_head", "head", head, "EnergyHead", HEAD_FIELDS)
    weight = head.hidden_embed.weight
    size = weight.shape[1]
    if hidden.dim() != 2 or hidden.shape[1] != size:
        raise ValueError(f"energy_head: hidden must be [R, {size}], got {list(hidden.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"energy_head: hidden is {hidden.dtype} on {hidden.device}, the head {weight.dtype} on {weight.device}"
        )
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"energy_head: samples must be a positive int, got {samples!r}")


def energy_head(
    head,
    hidden: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    samples: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden [R, H], seeds/steps int64 [R] -> latents [R, samples, latent] in hidden's dtype.

    head: its weights as calm_engine.engine.weights.EnergyHead describes them. Row r's noise is
    `uniform_noise(seeds, steps, samples, noise_size)[r]`, generated in the first kernel.
    Math (M = R * samples, c and p_l once per row r):
        x = LN(noise_embd(eps));  c = LN(hidden_embd(h));  p_l = W1_l[:, H:] c + b1_l
        block l: t = SiLU(SiLU(W1_l[:, :H] LN_l(x) + p_l)); (g, v) = W3_l W2-output; x += Wd_l(SiLU(g) * v) + bd_l
        out = Wf2 SiLU(Wf1 LN_f(x) + bf1) + bf2
    Launches: 1 noise+embed+LN, 1 + 4 per-row (hidden path), 4 per block, 2 final (24 for CALM-M). Each GEMM
    spans the whole GPU; one persistent kernel would save the ~1 us launch gaps under a CUDA graph but would leave
    most SMs idle at R=1 (a [200, 1024] activation is 13 tiles of 16 rows).
    Floors at CALM-M, R=1, samples=200, bf16: FLOPs = 200 x 44.6 MFLOP + 10.5 MFLOP = 8.9 GFLOP / 990 TFLOP/s
    = 9.0 us; bytes = 54 MB of weights (27 M params) + ~6 MB activations = 60 MB / 4.8 TB/s = 12.5 us: memory
    binds at R=1, compute from R of about 2 (R=8: 71 GFLOP, 72 us vs 14 us).
    """
    _check(head, hidden, samples)
    check_float("energy_head", "hidden", hidden)
    rows = hidden.shape[0]
    check_int("energy_head", "seeds", seeds, (rows,))
    check_int("energy_head", "steps", steps, (rows,))
    if seeds.dtype != torch.int64:
        raise ValueError(f"energy_head: seeds must be int64 (64-bit Philox keys), got {seeds.dtype}")
    size, latent, noise_size = hidden.shape[1], head.final_second.weight.shape[0], head.noise_embed.weight.shape[1]
    m = rows * samples
    if out is None:
        out = torch.empty(rows, samples, latent, device=hidden.device, dtype=hidden.dtype)
    elif out.shape != (rows, samples, latent) or not out.is_contiguous():
        raise ValueError(f"energy_head: out must be a contiguous [{rows}, {samples}, {latent}] tensor")
    if rows == 0:
        return out
    check_launch(_noise_embed_kernel, "energy_head", hidden, seeds, steps, out)
    x = torch.empty(m, size, device=hidden.device, dtype=hidden.dtype)
    # The noise GEMM is NOISE deep (64 at CALM-M) in one tl.dot. As IEEE fp32 FMA dots, a 64 x 64 tile held 13 KB of
    # spills (ptxas, sm_90); 32 x 32 over 8 warps holds none. Tensor-core dtypes keep 64 x 64 tiles.
    fp32 = hidden.dtype == torch.float32
    tile = 32 if fp32 else 64
    block_m, block_n = min(tile, max(16, next_pow2(m))), min(tile, max(16, next_pow2(size)))
    emb, emb_norm = head.noise_embed, head.noise_norm
    _noise_embed_kernel[(-(-m // block_m),)](
        seeds, steps, emb.weight, emb.bias, emb_norm.weight, emb_norm.bias, x,
        m, samples, size, noise_size, emb.weight.stride(0), x.stride(0), emb_norm.eps,
        PRECISION=dot_precision(hidden.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        NOISE_P2=max(16, next_pow2(noise_size)), num_warps=8 if fp32 else dot_warps(block_m, block_n),
        enable_fp_fusion=False,
    )  # fmt: skip

    condition = fused_linear(hidden, head.hidden_embed.weight, head.hidden_embed.bias)
    scratch_a = torch.empty(m, size, device=hidden.device, dtype=hidden.dtype)
    scratch_b = torch.empty_like(scratch_a)
    hidden_norm = head.hidden_norm
    for block in head.blocks:
        third = block.third
        row_bias = fused_linear(
            condition, block.hidden_half.weight, block.hidden_half.bias, norm="layer", norm_weight=hidden_norm.weight,
            norm_bias=hidden_norm.bias, eps=hidden_norm.eps,
        )  # fmt: skip
        fused_linear(
            x, block.noise_half.weight, None, norm="layer", norm_weight=block.norm.weight, norm_bias=block.norm.bias,
            eps=block.norm.eps, activation="silu", row_bias=row_bias, rows_per_group=samples, out=scratch_a,
        )  # fmt: skip
        fused_linear(scratch_a, block.second.weight, block.second.bias, activation="silu", out=scratch_b)
        fused_linear(
            scratch_b, third.weight[:size], third.bias[:size], up_weight=third.weight[size:],
            up_bias=third.bias[size:], out=scratch_a,
        )  # fmt: skip
        fused_linear(scratch_a, block.down.weight, block.down.bias, residual=x, out=x)
    final_norm = head.final_norm
    fused_linear(
        x, head.final_first.weight, head.final_first.bias, norm="layer", norm_weight=final_norm.weight,
        norm_bias=final_norm.bias, eps=final_norm.eps, activation="silu", out=scratch_a,
    )  # fmt: skip
    fused_linear(scratch_a, head.final_second.weight, head.final_second.bias, out=out.view(m, latent))
    return out


def energy_head_ref(head, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """hidden [R, H], explicit noise [R, samples, noise_size] -> latents [R, samples, latent], in plain torch.

    The model's EnergyHead on every (row, sample), with the per-row work done once per row: the hidden-state
    embedding and the hidden half of every block's first linear (the engine's PyTorch step runs exactly this)."""
    _check(head, hidden, max(1, noise.shape[1] if noise.dim() == 3 else 1))
    noise_size = head.noise_embed.weight.shape[1]
    if noise.dim() != 3 or noise.shape[0] != hidden.shape[0] or noise.shape[2] != noise_size:
        raise ValueError(f"energy_head_ref: noise must be [{hidden.shape[0]}, samples, {noise_size}]")
    condition = reference.norm(reference.linear(hidden, head.hidden_embed), head.hidden_norm)
    x = reference.norm(reference.linear(noise.to(hidden.dtype), head.noise_embed), head.noise_norm)
    for block in head.blocks:
        row_part = reference.linear(condition, block.hidden_half)[:, None]
        y = F.silu(reference.linear(reference.norm(x, block.norm), block.noise_half) + row_part)
        y = F.silu(reference.linear(y, block.second))
        gate, up = reference.linear(y, block.third).chunk(2, dim=-1)
        x = x + reference.linear(F.silu(gate) * up, block.down)
    y = F.silu(reference.linear(reference.norm(x, head.final_norm), head.final_first))
    return reference.linear(y, head.final_second)

"""One fused GEMM building block: out = [residual +] epilogue(norm(A) @ W^T + bias + row_bias), used by the heads.

The energy head, the autoencoder and the input compression are chains of linears whose norms, activations, gating,
per-row biases and residuals all fit around a GEMM. This file owns that GEMM, so each of those ops is a short list
of launches with nothing materialised between a norm and its matmul or a matmul and its activation.
"""

from __future__ import annotations

import torch

from .rms_norm import rms_norm_ref
from .utils import check_float, check_launch, check_tile, dot_depth, dot_precision, dot_warps, jit, next_pow2, tl

NORMS = {None: 0, "layer": 1, "rms": 2}
ACTIVATIONS = {None: 0, "silu": 1}


@jit
def _load_a(a_ptr, ids_ptr, rows, cols, row_mask, col_mask, stride_am, ids_per_row, gather_cols, GATHER: tl.constexpr):
    """A[rows, cols] as float32; with GATHER, A[m, k] = table[ids[m, k // gather_cols], k % gather_cols]."""
    mask = row_mask[:, None] & col_mask[None, :]
    if GATHER:
        ids = tl.load(ids_ptr + rows[:, None] * ids_per_row + cols[None, :] // gather_cols, mask=mask, other=0)
        ptrs = a_ptr + ids.to(tl.int64) * stride_am + cols[None, :] % gather_cols
    else:
        ptrs = a_ptr + rows[:, None] * stride_am + cols[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@jit(do_not_specialize=("M", "rows_per_group"))
def _fused_linear_kernel(
    a_ptr, ids_ptr, w_ptr, wup_ptr, bias_ptr, bup_ptr, row_bias_ptr, res_ptr, nw_ptr, nb_ptr, out_ptr,
    M, N, K, stride_am, stride_wn, stride_wupn, stride_rbm, stride_rm, stride_om,
    rows_per_group, ids_per_row, gather_cols, eps,
    NORM: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_BIAS: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    n_mask = cols_n < N
    ks = tl.arange(0, BLOCK_K)

    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM != 0:
        # Row statistics over the whole K first (two passes: the mean, then the centred second moment).
        if NORM == 1:
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = _load_a(a_ptr, ids_ptr, rows, k0 + ks, row_mask, k0 + ks < K, stride_am, ids_per_row,
                            gather_cols, GATHER)  # fmt: skip
                total += tl.sum(a, axis=1)
            mean = total / K
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + ks < K
            a = _load_a(a_ptr, ids_ptr, rows, k0 + ks, row_mask, k_mask, stride_am, ids_per_row, gather_cols, GATHER)
            centred = tl.where(k_mask[None, :], a - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols_k = k0 + ks
        k_mask = cols_k < K
        a = _load_a(a_ptr, ids_ptr, rows, cols_k, row_mask, k_mask, stride_am, ids_per_row, gather_cols, GATHER)
        if NORM == 1:  # LayerNorm: affine in float32, rounded once to the GEMM dtype (as nn.LayerNorm does)
            nw = tl.load(nw_ptr + cols_k, mask=k_mask, other=0.0).to(tl.float32)
            nb = tl.load(nb_ptr + cols_k, mask=k_mask, other=0.0).to(tl.float32)
            a = (a - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]
        if NORM == 2:  # Llama RMSNorm: normalise in float32, cast to the input dtype, then scale
            nw = tl.load(nw_ptr + cols_k, mask=k_mask, other=0.0)
            a = (a * rstd[:, None]).to(nw.dtype).to(tl.float32) * nw.to(tl.float32)[None, :]
        a = a.to(w_ptr.dtype.element_ty)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + cols_n[None, :].to(tl.int64) * stride_wn + cols_k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            wu = tl.load(wup_ptr + cols_n[None, :].to(tl.int64) * stride_wupn + cols_k[:, None], mask=w_mask, other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ROW_BIAS:
        groups = rows // rows_per_group
        rb_mask = row_mask[:, None] & n_mask[None, :]
        acc += tl.load(row_bias_ptr + groups[:, None] * stride_rbm + cols_n[None, :], mask=rb_mask, other=0.0).to(
            tl.float32
        )
    if GATED:  # SiLU(gate) * up
        if HAS_BIAS:
            acc_up += tl.load(bup_ptr + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACT == 1:
        acc = acc * tl.sigmoid(acc)
    out_mask = row_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols_n[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def pick_blocks(m: int, n: int, k: int, dtype: torch.dtype, gated: bool = False) -> tuple[int, int, int]:
    """GEMM tiles: rows up to 64 (decode batches are small), 64 output columns, K as deep as the dtype's dots take
    (dot_depth), half that when gated (two weight tiles per step: 64 deep spilled 64 B on sm_80 at unaligned
    shapes); 16 minimum (tl.dot)."""
    depth = max(16, dot_depth(dtype) // (2 if gated else 1))
    return min(64, max(16, next_pow2(m))), min(64, max(16, next_pow2(n))), min(depth, max(16, next_pow2(k)))


def _check_matrix(what: str, t: torch.Tensor, rows: int | None, cols: int | None) -> None:
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"fused_linear: {what} must be [{rows}, {cols}], got {list(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"fused_linear: {what} must have unit stride along its last dimension")


def fused_linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    up_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
    row_bias: torch.Tensor | None = None,
    rows_per_group: int = 1,
    residual: torch.Tensor | None = None,
    gather_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """A [M, K] (or a table [V, C] with gather_ids [M, K // C]), weight [N, K] (any row stride) -> out [M, N].

    out = residual + f(norm(A) @ weight^T + bias + row_bias[m // rows_per_group]), where f is SiLU or identity,
    or with up_weight the gate: SiLU(norm(A) @ weight^T + bias) * (norm(A) @ up_weight^T + up_bias).
    norm: "layer" (nn.LayerNorm: weight and bias) or "rms" (Llama RMSNorm: weight), over the K columns of A.
    Accumulates in float32; `out` (default: new, A's dtype) may alias `residual` but never A.
    Floors for one CALM-M head linear, M = 200 x 64 samples, 1024 x 1024 bf16: 2*M*N*K = 27 GFLOP / 990 TFLOP/s
    = 27 us (compute-bound above M of about 300); 2 MB of weight + 2*M*N*2 B activations = 54 MB / 4.8 TB/s = 11 us.
    """
    if norm not in NORMS or activation not in ACTIVATIONS:
        raise ValueError(f"fused_linear: norm must be one of {list(NORMS)} and activation one of {list(ACTIVATIONS)}")
    check_float("fused_linear", "weight", weight)
    n, k = weight.shape if weight.dim() == 2 else (None, None)
    _check_matrix("weight", weight, None, None)
    if gather_ids is not None:
        if gather_ids.dim() != 2 or k % gather_ids.shape[1] or a.shape[1] != k // gather_ids.shape[1]:
            raise ValueError(
                f"fused_linear: gather_ids [M, J] must pick J rows of a table [V, K/J] for K={k}, got ids "
                f"{list(gather_ids.shape)} and table {list(a.shape)}"
            )
        m = gather_ids.shape[0]
        gather_ids = gather_ids.contiguous()
        _check_matrix("table", a, None, None)
    else:
        m = a.shape[0] if a.dim() == 2 else None
        _check_matrix("a", a, None, k)
    if a.dtype != weight.dtype:
        raise ValueError(f"fused_linear: a is {a.dtype} but weight is {weight.dtype}")
    for what, t, rows, cols in (
        ("up_weight", up_weight, n, k),
        ("row_bias", row_bias, -(-m // rows_per_group), n),
        ("residual", residual, m, n),
        ("out", out, m, n),
    ):
        if t is not None:
            _check_matrix(what, t, rows, cols)
    for what, t, size in (("bias", bias, n), ("up_bias", up_bias, n), ("norm_weight", norm_weight, k)):
        if t is not None and (t.dim() != 1 or t.shape[0] != size or t.stride(0) != 1):
            raise ValueError(f"fused_linear: {what} must be a contiguous [{size}] vector, got {list(t.shape)}")
    if norm is not None and norm_weight is None or norm == "layer" and norm_bias is None:
        raise ValueError(f"fused_linear: norm={norm!r} needs norm_weight (and norm_bias for 'layer')")
    if (bias is None) != (up_bias is None) and up_weight is not None:
        raise ValueError("fused_linear: bias and up_bias must be given together")
    if blocks is None:
        blocks = pick_blocks(m, n, k, weight.dtype, gated=up_weight is not None)
    elif isinstance(blocks, tuple) and len(blocks) == 3:
        blocks = tuple(check_tile("fused_linear", f"blocks[{i}]", b) for i, b in enumerate(blocks))
    else:
        raise ValueError(f"fused_linear: blocks must be a (block_m, block_n, block_k) tuple, got {blocks!r}")
    if out is None:
        out = torch.empty(m, n, device=weight.device, dtype=a.dtype)
    if m == 0:
        return out
    check_launch(_fused_linear_kernel, "fused_linear", a, weight, out)
    block_m, block_n, block_k = blocks
    dummy = out
    grid = (-(-m // block_m), -(-n // block_n))
    _fused_linear_kernel[grid](
        a, dummy if gather_ids is None else gather_ids, weight, dummy if up_weight is None else up_weight,
        dummy if bias is None else bias, dummy if up_bias is None else up_bias,
        dummy if row_bias is None else row_bias, dummy if residual is None else residual,
        dummy if norm_weight is None else norm_weight, dummy if norm_bias is None else norm_bias, out,
        m, n, k, a.stride(0), weight.stride(0), 0 if up_weight is None else up_weight.stride(0),
        0 if row_bias is None else row_bias.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        rows_per_group, 1 if gather_ids is None else gather_ids.shape[1], k if gather_ids is None else a.shape[1], eps,
        NORM=NORMS[norm], GATHER=gather_ids is not None, HAS_BIAS=bias is not None, HAS_ROW_BIAS=row_bias is not None,
        GATED=up_weight is not None, ACT=ACTIVATIONS[activation], HAS_RES=residual is not None,
        PRECISION=dot_precision(weight.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=dot_warps(block_m, block_n),
    )  # fmt: skip
    return out


def residual_gated_mlp(x: torch.Tensor, layer) -> torch.Tensor:
    """x += down(SiLU(gate(rms(x))) * up(rms(x))) in place, in two launches: the normed gate/up GEMM with its SiLU
    gating, then down with the residual. layer: an autoencoder layer's weights (`norm`: RMSNorm, `mlp`: gate_up
    packed gate rows then up rows, down), as calm_engine.engine.weights.DecoderLayer describes them."""
    mlp, norm = layer.mlp, layer.norm
    gate_up, half = mlp.gate_up, mlp.gate_up.weight.shape[0] // 2
    gate_bias, up_bias = (None, None) if gate_up.bias is None else (gate_up.bias[:half], gate_up.bias[half:])
    hidden = fused_linear(
        x, gate_up.weight[:half], gate_bias, up_weight=gate_up.weight[half:], up_bias=up_bias, norm="rms",
        norm_weight=norm.weight, eps=norm.eps,
    )  # fmt: skip
    return fused_linear(hidden, mlp.down.weight, mlp.down.bias, residual=x, out=x)


def fused_linear_ref(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    up_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
    row_bias: torch.Tensor | None = None,
    rows_per_group: int = 1,
    residual: torch.Tensor | None = None,
    gather_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fused_linear` in plain torch, op by op as the model modules compute it."""
    x = a if gather_ids is None else a[gather_ids].reshape(gather_ids.shape[0], -1)
    if norm == "layer":
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    elif norm == "rms":
        x = rms_norm_ref(x, norm_weight, eps)
    y = torch.nn.functional.linear(x, weight, bias)
    if row_bias is not None:
        y = y + row_bias.repeat_interleave(rows_per_group, dim=0)[: y.shape[0]]
    if up_weight is not None:
        y = torch.nn.functional.silu(y) * torch.nn.functional.linear(x, up_weight, up_bias)
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    return y if residual is None else residual + y

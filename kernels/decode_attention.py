"""Decode attention: one query per row over that row's KV-cache slot, grouped-query aware, split over the sequence.

Flash-decoding: each program owns one (row, kv head, sequence split) and all the query heads that share the kv head,
so each key/value is read once per row; a second kernel merges the splits' partial softmaxes by their log-sum-exp.
"""

from __future__ import annotations

import torch

from .utils import MIN_TILE, check_float, check_int, check_launch, dot_precision, jit, next_pow2, tl

BLOCK_N = 64  # cache positions per loop step (half precision; fp32 takes half) and the split granularity
MIN_SPLIT = 256  # positions per split at least: shorter splits cost more in the merge than they save
MAX_SPLITS = 16  # the merge holds all of a head's splits in one [MAX_SPLITS, head_dim] tile
TARGET_PROGRAMS = 4 * 132  # about four programs per SM of an H100/H200
LOG2_E = 1.4426950408889634


@jit(do_not_specialize=("split_len", "num_splits"))
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, H, C, D, split_len, num_splits,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_kc, stride_vs, stride_vh, stride_vc, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One (row, kv head, split): the GROUP query heads of the kv head, padded to BLOCK_G >= 16 rows for tl.dot.

    QK^T and PV run on tensor cores (half precision; fp32 as IEEE FMA dots), and the K/V tile loads feed the dots,
    so triton software-pipelines them (cp.async) across the loop. The softmax runs in base 2 on scale * log2(e)
    scaled scores; the split path stores each split's output and its log2-sum-exp2 for the merge.
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + row).to(tl.int32), C)
    length = tl.where(slot < 0, 0, length)  # slot -1: a padding row of a CUDA-graph batch, reads nothing
    slot = tl.maximum(slot, 0)
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh

    start = split * split_len
    end = tl.minimum(start + split_len, length)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kc + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        scores = tl.where(p_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * stride_vc + d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    has = l_i > 0
    result = acc / tl.where(has, l_i, 1.0)[:, None]  # an empty row or split gives 0
    if SPLIT:
        part = (row * H + heads).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * D + d[None, :], result, mask=q_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)
    else:
        ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(ptrs, result.to(out_ptr.dtype.element_ty), mask=q_mask)


@jit(do_not_specialize=("num_splits",))
def _decode_attention_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, H, D, num_splits, stride_ob, stride_oh,
    SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge one (row, head)'s splits: weights 2^(lse_s - max lse), normalised."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    s_mask = splits < num_splits
    d = tl.arange(0, BLOCK_D)
    base = (row * H + head).to(tl.int64) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: every weight is 2^-inf = 0
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, axis=0)
    weights = weights / tl.where(total > 0, total, 1.0)
    parts = tl.load(
        part_out_ptr + (base + splits)[:, None] * D + d[None, :], mask=s_mask[:, None] & (d < D)[None, :], other=0.0
    )
    result = tl.sum(weights[:, None] * parts, axis=0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, result.to(out_ptr.dtype.element_ty), mask=d < D)


def _check(q, k_cache, v_cache, slots, lengths) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention: q must be [B, H, D] and k_cache, v_cache equal [S, KVH, C, D], got "
            f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}"
        )
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"decode_attention: head dim {dim} vs cache {k_cache.shape[3]}, or {heads} heads not a "
                         f"multiple of {kv_heads} kv heads")  # fmt: skip
    for what, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_float("decode_attention", what, t)
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {what} must have unit stride along the head dimension")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}")
    check_int("decode_attention", "slots", slots, (batch,))
    check_int("decode_attention", "lengths", lengths, (batch,))


def split_plan(batch: int, kv_heads: int, capacity: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, positions per split) over a cache of `capacity` positions: by default enough splits for about
    TARGET_PROGRAMS programs, each at least MIN_SPLIT long, at most MAX_SPLITS; split lengths are whole BLOCK_N steps.
    Static shapes only, so a CUDA graph captures the same plan whatever the rows' lengths."""
    if num_splits is None:
        wanted = -(-TARGET_PROGRAMS // (batch * kv_heads))
        num_splits = max(1, min(wanted, -(-capacity // MIN_SPLIT), MAX_SPLITS))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be an int from 1 to {MAX_SPLITS}, got {num_splits!r}")
    split_len = -(-capacity // num_splits)
    split_len = -(-split_len // BLOCK_N) * BLOCK_N
    return -(-capacity // split_len), split_len


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, D], caches [S, KVH, C, D], slots/lengths int [B] -> [B, H, D].

    out[b, h] = softmax(scale * q[b, h] . K[slots[b], h // (H / KVH), :lengths[b]]) @ V[...]; a row with slot < 0
    or length 0 gives zeros (CUDA-graph padding). Lengths above C are clamped to C. The split count depends only on
    the static shapes (B, KVH, C), never on the device-resident lengths, so the launch is graph-capturable.
    Floors at CALM-M, B = 64 rows x 4096 positions, 16 heads x 64, bf16: K and V = 2 * 64 * 4096 * 16 * 64 * 2 B
    = 1.07 GB / 4.8 TB/s = 224 us per layer; 4 FLOP per element read = 1.1 GFLOP (17 GFLOP as issued: the one query
    head of each kv head is padded to 16 tensor-core rows), far below the 990 TFLOP/s matmul ceiling.
    """
    _check(q, k_cache, v_cache, slots, lengths)
    batch, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"decode_attention: out must be {list(q.shape)} with unit last stride")
    if batch == 0:
        return out
    check_launch(_decode_attention_kernel, "decode_attention", q, k_cache, v_cache, slots, lengths, out)
    num_splits, split_len = split_plan(batch, kv_heads, capacity, num_splits)
    group = heads // kv_heads
    block_d = max(MIN_TILE, next_pow2(dim))
    # fp32 runs IEEE dots on FMA units, which hold their operands in registers: 64 positions x 128 dims spilled
    # 0.5-11 KB (ptxas, sm_80/sm_90); 32 positions over 8 warps none. Split lengths stay multiples of BLOCK_N.
    block_n, warps = (BLOCK_N // 2, 8) if q.dtype == torch.float32 else (BLOCK_N, 4)
    if num_splits > 1:
        part_out = torch.empty(batch, heads, num_splits, dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out
    _decode_attention_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, slots, lengths, out, part_out, part_lse,
        scale * LOG2_E, heads, capacity, dim, split_len, num_splits,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(MIN_TILE, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=num_splits > 1, PRECISION=dot_precision(q.dtype), num_warps=warps,
    )  # fmt: skip
    if num_splits > 1:
        _decode_attention_reduce_kernel[(batch, heads)](
            part_out, part_lse, out, heads, dim, num_splits, out.stride(0), out.stride(1),
            SPLITS_P2=next_pow2(num_splits), BLOCK_D=block_d, num_warps=1,
        )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same in torch (float32 softmax, as the model's SDPA on CPU), repeat_interleave for grouped heads."""
    _check(q, k_cache, v_cache, slots, lengths)
    groups = q.shape[1] // k_cache.shape[1]
    capacity = k_cache.shape[2]
    valid_row = slots >= 0
    index = slots.clamp_min(0).long()
    keys = k_cache[index].repeat_interleave(groups, dim=1).float()  # [B, H, C, D]
    values = v_cache[index].repeat_interleave(groups, dim=1).float()
    scores = torch.einsum("bhd,bhcd->bhc", q.float() * scale, keys)
    length = torch.where(valid_row, lengths.long().clamp(max=capacity), 0)
    visible = torch.arange(capacity, device=q.device)[None, :] < length[:, None]  # [B, C]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row: all -inf -> NaN -> 0
    return torch.einsum("bhc,bhcd->bhd", probs, values).to(q.dtype)

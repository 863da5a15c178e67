"""The kernel tests' shapes and input builders, shared with benchmarks/compile_check.py.

Importing this module has no side effects (the tests' conftest switches the triton interpreter on; the compile check
must not), so the compile check records exactly the launches the tests make, at the same shapes.
"""

from __future__ import annotations

import torch

# (rows, columns...) of rms_norm and swiglu inputs.
RMS_NORM_SHAPES = [(3, 37), (2, 5, 123), (1, 1030)]
SWIGLU_SHAPES = [(3, 37), (5, 1031), (2, 3, 700)]

# (samples, dim) of uniform_noise, over PHILOX_SEEDS rows.
NOISE_SIZES = [(1, 1), (13, 7), (200, 6), (3, 1031)]
PHILOX_SEEDS = [0, 1, 2**32, 2**32 + 5, 2**63 - 1, -1, -(2**63), 0x5DEECE66D, -123456789012345]

# fused_linear: flag sets, and (m, n, k, blocks) sizes (blocks None: the launcher's choice).
LINEAR_CASES = {
    "plain": dict(),
    "bias-silu": dict(bias=True, activation="silu"),
    "layernorm-rowbias-silu": dict(norm="layer", row_bias=5, activation="silu"),
    "rms-gated": dict(norm="rms", bias=True, gated=True),
    "residual": dict(bias=True, residual=True),
}
LINEAR_SIZES = [(37, 45, 70, (16, 16, 16)), (3, 19, 23, None), (70, 33, 130, None)]

# decode_attention: batch, heads, kv heads, head dim, slots, capacity; and the split counts tested (None: automatic).
ATTENTION_SHAPES = {
    "gqa3-d24": (5, 6, 2, 24, 4, 300),
    "mha-d16": (3, 3, 3, 16, 3, 70),
    "gqa4-d20": (4, 8, 2, 20, 5, 129),
    "gqa2-d32-long": (1, 4, 2, 32, 2, 600),  # batch 1 over >= 512 positions: the launcher splits by itself
    "gqa20-d16": (2, 40, 2, 16, 3, 90),  # 20 query heads per kv head: more than one 16-row tensor-core tile
    "gqa8-d128": (2, 16, 2, 128, 2, 150),  # Llama-style 128-wide heads (device_check times this head size)
}
ATTENTION_SPLITS = [1, 3, None]

# Energy head models (random_calm_model overrides) and (rows, samples).
HEAD_SHAPES = {  # odd hidden and noise sizes, 2 and 3 blocks, a latent not a power of two
    "h40-n6-l8": dict(calm=dict(hidden_size=40, noise_size=6)),
    "h72-n20-l11": dict(calm=dict(hidden_size=72, noise_size=20, num_mlp_layers=3), latent_size=11),
}
HEAD_ROWS_SAMPLES = [(1, 1), (3, 7), (2, 19)]

# Autoencoder models (random_calm_model overrides) and row counts, for ae_encode, compress and decode_argmax.
AE_MODELS = {"k4-v300": dict(vocab_size=300), "k2-v1031": dict(vocab_size=1031, patch_size=2, latent_size=13)}
AE_ROWS = [1, 6, 37]
# project_argmax alone: (rows, vocab, dim) and split counts, at block_m=16.
ARGMAX_SIZES = [(5, 700, 24), (33, 389, 70)]
ARGMAX_SPLITS = [1, 2, 5]


def linear_inputs(m, n, k, dtype, device, bias=False, norm=None, gated=False, row_bias=None, residual=False,
                  activation=None):  # fmt: skip
    """(args, kwargs) of a fused_linear call with the flags of one LINEAR_CASES entry; weight is a row-strided view."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device, dtype)

    weight = rand(2 * n, k, scale=k**-0.5)
    kwargs = dict(activation=activation, norm=norm)
    args = (rand(m, k), weight[:n], rand(n) if bias else None)  # a row-strided weight view, as the heads pass
    if norm:
        kwargs.update(norm_weight=rand(k, scale=0.1) + 1, norm_bias=rand(k, scale=0.1) if norm == "layer" else None)
    if gated:
        kwargs.update(up_weight=weight[n:], up_bias=rand(n) if bias else None)
    if row_bias:
        kwargs.update(row_bias=rand(-(-m // row_bias), n), rows_per_group=row_bias)
    if residual:
        kwargs.update(residual=rand(m, n))
    return args, kwargs


def attention_inputs(shape, dtype, device):
    """(q, k_cache, v_cache, slots, lengths) for one ATTENTION_SHAPES entry: ragged lengths (the first row full, the
    last one position), caches that are one layer of a bigger allocation (not contiguous per layer, as an engine
    keeps them)."""
    batch, heads, kv_heads, dim, slots, capacity = shape
    q = torch.randn(batch, heads, dim).to(device, dtype)
    k_all = torch.randn(slots, 2, kv_heads, capacity, dim).to(device, dtype)
    v_all = torch.randn(slots, 2, kv_heads, capacity, dim).to(device, dtype)
    slot_ids = torch.randperm(slots)[:batch]
    slot_ids = torch.cat((slot_ids, torch.zeros(batch - len(slot_ids), dtype=torch.long)))
    lengths = torch.randint(1, capacity + 1, (batch,))
    lengths[0] = capacity
    if batch > 1:
        lengths[-1] = 1
    return q, k_all[:, 1], v_all[:, 1], slot_ids.to(device), lengths.to(device)

"""fused_linear (the GEMM behind the heads) against its op-by-op reference, every flag at odd shapes."""

from __future__ import annotations

import pytest
import torch

from kernels.fused_linear import fused_linear, fused_linear_ref
from tests.conftest import assert_rel_close
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned

pytestmark = needs_triton

CASES = {
    "plain": dict(),
    "bias-silu": dict(bias=True, activation="silu"),
    "layernorm-rowbias-silu": dict(norm="layer", row_bias=5, activation="silu"),
    "rms-gated": dict(norm="rms", bias=True, gated=True),
    "residual": dict(bias=True, residual=True),
}


def _inputs(m, n, k, dtype, bias=False, norm=None, gated=False, row_bias=None, residual=False, activation=None):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(DEVICE, dtype)

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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m, n, k, blocks", [(37, 45, 70, (16, 16, 16)), (3, 19, 23, None), (70, 33, 130, None)])
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_matches_reference(case, m, n, k, blocks, dtype, rel):
    args, kwargs = _inputs(m, n, k, dtype, **CASES[case])
    out = fused_linear(*args, out=poisoned(m, n, dtype=dtype), blocks=blocks, **kwargs)
    assert_rel_close(out, fused_linear_ref(*args, **kwargs), rel, case)


@pytest.mark.parametrize("blocks", [(16, 16, 16), None])
def test_gather_rows_of_a_table(blocks):
    """A[m] = concat(table[ids[m, 0]], ..., table[ids[m, J-1]]): the compression's embedding gather."""
    table = torch.randn(50, 24, device=DEVICE)
    ids = torch.randint(0, 50, (13, 3), device=DEVICE)
    weight = torch.randn(21, 72, device=DEVICE) / 72**0.5
    kwargs = dict(gather_ids=ids, activation="silu")
    out = fused_linear(table, weight, None, out=poisoned(13, 21), blocks=blocks, **kwargs)
    assert_rel_close(out, fused_linear_ref(table, weight, None, **kwargs), 2e-5, "gather")


def test_residual_in_place():
    x = torch.randn(9, 20, device=DEVICE)
    a, weight = torch.randn(9, 31, device=DEVICE), torch.randn(20, 31, device=DEVICE)
    expected = fused_linear_ref(a, weight, residual=x.clone())
    fused_linear(a, weight, residual=x, out=x)
    assert_rel_close(x, expected, 2e-5, "in place")


def test_validation():
    a, weight = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="a must be"):
        fused_linear(torch.randn(4, 7), weight)
    with pytest.raises(ValueError, match="norm"):
        fused_linear(a, weight, norm="batch")
    with pytest.raises(ValueError, match="needs norm_weight"):
        fused_linear(a, weight, norm="layer", norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="dtype|float"):
        fused_linear(a.long(), weight)

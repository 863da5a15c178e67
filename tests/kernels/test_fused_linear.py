"""fused_linear (the GEMM behind the heads) against its op-by-op reference, every flag at odd shapes."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.fused_linear import fused_linear, fused_linear_ref

from tests.conftest import assert_rel_close
from tests.kernels.cases import LINEAR_CASES, LINEAR_SIZES, linear_inputs
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned

pytestmark = needs_triton


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("m, n, k, blocks", LINEAR_SIZES)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_matches_reference(case, m, n, k, blocks, dtype, rel):
    args, kwargs = linear_inputs(m, n, k, dtype, DEVICE, **LINEAR_CASES[case])
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
    for bad in ((8, 16, 16), (16, 24, 16), (16, 16, 512)):  # below 16 breaks tl.dot on hardware
        with pytest.raises(ValueError, match=r"blocks\[\d\] must be a power of two from 16"):
            fused_linear(a, weight, blocks=bad)
    with pytest.raises(ValueError, match="blocks must be a"):
        fused_linear(a, weight, blocks=(16, 16))

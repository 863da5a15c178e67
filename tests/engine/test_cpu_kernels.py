"""The C++ step's AVX-512 kernels (csrc/packed_linear.h, csrc/vector_math.h) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_engine.engine import cpu_step

_calm_cpu = cpu_step.model_runner._calm_cpu
pytestmark = pytest.mark.skipif(
    _calm_cpu is None or not _calm_cpu.avx512_supported(), reason="calm_engine._calm_cpu is not built or no AVX-512F"
)


def packed(x, weight, bias, y, accumulate, groups=None):
    groups = groups or (0, -(-weight.shape[0] // _calm_cpu.PACK_WIDTH))
    _calm_cpu.packed_linear_into(x.numpy(), weight.numpy(), None if bias is None else bias.numpy(), y.numpy(),
                                 accumulate, *groups)  # fmt: skip
    return y


@pytest.mark.parametrize(
    ("rows", "out", "width"), [(1, 1, 1), (3, 31, 7), (8, 32, 64), (9, 33, 130), (17, 100, 257), (64, 688, 256)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(rows, out, width, with_bias):
    """Odd sizes: partial groups of 32 outputs, row blocks of 8 with a remainder, widths not a multiple of 16."""
    g = torch.Generator().manual_seed(rows * 1000 + out + width)
    x, weight = torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    y = packed(x, weight, bias, torch.full((rows, out), float("nan")), accumulate=False)  # poisoned output
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # one float32 sum of `width` products per output: error within width * 2^-24 of the sum of |products|
    scale = (x.double().abs() @ weight.double().abs().T + 1) * (width + 2) * 2**-24
    assert torch.all((y.double() - expected).abs() <= scale)


def test_packed_linear_accumulates_and_keeps_other_groups():
    g = torch.Generator().manual_seed(7)
    rows, out, width = 5, 100, 40  # groups of 32: [0, 32), [32, 64), [64, 96), [96, 100)
    x, weight, bias = torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g), torch.randn(out)
    old = torch.randn(rows, out, generator=g)
    y = packed(x, weight, bias, old.clone(), accumulate=True, groups=(1, 3))
    expected = (x.double() @ weight.double().T + bias.double() + old.double()).float()
    torch.testing.assert_close(y[:, 32:96], expected[:, 32:96], rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :32], old[:, :32]) and torch.equal(y[:, 96:], old[:, 96:])


def test_packed_linear_rows_do_not_depend_on_the_batch():
    """A row's result is bit-identical whether it runs alone or in any row block of a larger batch."""
    g = torch.Generator().manual_seed(11)
    x, weight = torch.randn(13, 96, generator=g), torch.randn(70, 96, generator=g)
    whole = packed(x, weight, None, torch.empty(13, 70), accumulate=False)
    for r in (0, 7, 8, 12):
        alone = packed(x[r : r + 1].clone(), weight, None, torch.empty(1, 70), accumulate=False)
        assert torch.equal(alone[0], whole[r])


def ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Distance from float64 values in units of the float32 spacing at the exact value."""
    exact32 = exact.astype(np.float32)
    spacing = np.spacing(np.abs(exact32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_vector_exp_within_two_ulp_and_its_edges():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-87, 88, 200_000), rng.uniform(-1, 1, 50_000), np.linspace(-20, 20, 4097)])
    x = x.astype(np.float32)
    got = _calm_cpu.vector_exp(x)
    assert ulps(got, np.exp(x.astype(np.float64))).max() <= 2
    edges = np.array([0.0, -0.0, 89.0, 1e30, np.inf, -104.0, -1e30, -np.inf, np.nan], dtype=np.float32)
    got = _calm_cpu.vector_exp(edges)
    assert got[0] == 1 and got[1] == 1
    assert np.all(np.isinf(got[2:5])) and np.all(got[2:5] > 0)
    assert np.all(got[5:8] == 0) and np.isnan(got[8])


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_vector_silu_mul_matches_torch(n):
    g = torch.Generator().manual_seed(n)
    gate, up = torch.randn(n, generator=g) * 6, torch.randn(n, generator=g)
    got = torch.from_numpy(_calm_cpu.vector_silu_mul(gate.numpy(), up.numpy()))
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 129])
def test_vector_dot_and_axpy_match_float64(n):
    g = torch.Generator().manual_seed(100 + n)
    a, b, y = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    exact = float(a.double() @ b.double())
    bound = (n + 1) * 2**-24 * float(a.double().abs() @ b.double().abs())
    assert abs(_calm_cpu.vector_dot(a.numpy(), b.numpy()) - exact) <= bound
    got = torch.from_numpy(_calm_cpu.vector_axpy(0.37, a.numpy(), y.numpy()))
    torch.testing.assert_close(got, (y.double() + 0.37 * a.double()).float(), rtol=2e-7, atol=1e-7)

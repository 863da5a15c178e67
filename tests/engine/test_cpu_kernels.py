"""The C++ step's kernels (csrc/step_kernels.h and the generic loops of csrc/isa.cpp) against float64 references, at
every instruction-set level this CPU runs: an AVX-512 machine thereby checks the AVX2 and generic paths too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_engine import native
from calm_engine.engine.step import native_step as cpu_step

_calm_cpu = native.calm_cpu
testing = getattr(_calm_cpu, "testing", None)  # the step's kernels one by one (csrc/test_bindings.cpp)
pytestmark = pytest.mark.skipif(
    _calm_cpu is None or not hasattr(_calm_cpu, "supported_isas"), reason="calm_engine._calm_cpu is not built"
)
SUPPORTED = cpu_step.supported_isas()


def levels(lowest: str = "generic") -> list:
    """ISA_LEVELS from `lowest` up, those this CPU does not run skipped with the reason."""
    return [
        pytest.param(level, marks=pytest.mark.skipif(level not in SUPPORTED, reason=f"this CPU does not run {level}"))
        for level in cpu_step.ISA_LEVELS[cpu_step.ISA_LEVELS.index(lowest) :]
    ]


# The vector levels with kernels of their own: avx512_bf16 and amx run the avx512 kernels but for the screen.
VECTOR = [p for p in levels("avx2") if p.values[0] in ("avx2", "avx512")]


def packed(isa, x, weight, bias, y, accumulate, groups=None):
    groups = groups or (0, -(-weight.shape[0] // testing.pack_width(isa)))
    testing.packed_linear_into(isa, x.numpy(), weight.numpy(), None if bias is None else bias.numpy(), y.numpy(),
                                 accumulate, *groups)  # fmt: skip
    return y


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize(
    ("rows", "out", "width"),
    [(1, 1, 1), (3, 31, 7), (7, 17, 9), (8, 32, 64), (9, 33, 130), (17, 100, 257), (131, 40, 33)],  # 131: row chunks
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(isa, rows, out, width, with_bias):
    """Odd sizes: partial groups (16 outputs at AVX2, 32 at AVX-512), row blocks (6, 8) with a remainder, widths not a
    multiple of the vector."""
    g = torch.Generator().manual_seed(rows * 1000 + out + width)
    x, weight = torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    y = packed(isa, x, weight, bias, torch.full((rows, out), float("nan")), accumulate=False)  # poisoned output
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # one float32 sum of `width` products per output (+ bias): within (width + 2) 2^-24 of the sum of |terms|
    scale = (x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())) * 2**-24
    assert torch.all((y.double() - expected).abs() <= (width + 2) * scale)


@pytest.mark.parametrize("isa", VECTOR)
def test_packed_linear_accumulates_and_keeps_other_groups(isa):
    g = torch.Generator().manual_seed(7)
    width = testing.pack_width(isa)
    rows, out, size = 5, 3 * width + 4, 40  # three whole groups and a partial one
    x, weight, bias = torch.randn(rows, size, generator=g), torch.randn(out, size, generator=g), torch.randn(out)
    old = torch.randn(rows, out, generator=g)
    y = packed(isa, x, weight, bias, old.clone(), accumulate=True, groups=(1, 3))
    expected = (x.double() @ weight.double().T + bias.double() + old.double()).float()
    inside = slice(width, 3 * width)
    torch.testing.assert_close(y[:, inside], expected[:, inside], rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :width], old[:, :width]) and torch.equal(y[:, 3 * width :], old[:, 3 * width :])


@pytest.mark.parametrize("isa", VECTOR)
def test_packed_linear_rows_do_not_depend_on_the_batch(isa):
    """A row's result is bit-identical whether it runs alone or in any row block of a larger batch: each output is
    the same float32 sum over the inputs in order (csrc/packed_linear.h), whatever the row count."""
    g = torch.Generator().manual_seed(11)
    x, weight = torch.randn(150, 96, generator=g), torch.randn(70, 96, generator=g)  # several row chunks
    whole = packed(isa, x, weight, None, torch.empty(150, 70), accumulate=False)
    for r in (0, 5, 6, 7, 8, 12, 47, 48, 64, 65, 149):
        alone = packed(isa, x[r : r + 1].clone(), weight, None, torch.empty(1, 70), accumulate=False)
        assert torch.equal(alone[0], whole[r])


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(SUPPORTED), reason="needs a CPU with AVX2 and AVX-512")
def test_packed_linear_is_the_same_at_avx2_and_avx512():
    """Bit-equal across the two widths: every output is one fused multiply-add per input, in input order, then + bias
    and + y, at 8 and at 16 lanes alike."""
    g = torch.Generator().manual_seed(12)
    x, weight, bias = torch.randn(11, 77, generator=g), torch.randn(45, 77, generator=g), torch.randn(45, generator=g)
    old = torch.randn(11, 45, generator=g)
    y2 = packed("avx2", x, weight, bias, old.clone(), accumulate=True)
    y512 = packed("avx512", x, weight, bias, old.clone(), accumulate=True)
    assert torch.equal(y2, y512)


def test_no_packed_products_at_the_generic_level():
    assert testing.pack_width("generic") == 0
    with pytest.raises(ValueError, match="no packed products at generic"):
        packed("generic", torch.ones(1, 4), torch.ones(2, 4), None, torch.empty(1, 2), accumulate=False, groups=(0, 0))


def test_unknown_or_unsupported_levels_are_refused_in_cpp():
    with pytest.raises(
        ValueError, match="unknown instruction-set level 'avx3'.*generic, avx2, avx512, avx512_bf16, amx"
    ):
        testing.pack_width("avx3")


def ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Distance from float64 values in units of the float32 spacing at the exact value."""
    exact32 = exact.astype(np.float32)
    spacing = np.spacing(np.abs(exact32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


EXP_EDGES = np.array([0.0, -0.0, 89.0, 1e30, np.inf, -104.0, -1e30, -np.inf, np.nan], dtype=np.float32)


@pytest.mark.parametrize("isa", levels())
def test_exp_within_two_ulp_and_its_edges(isa):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-87, 88, 100_001), rng.uniform(-1, 1, 20_003), np.linspace(-20, 20, 4097)])
    x = x.astype(np.float32)
    got = testing.vector_exp(isa, x)
    assert ulps(got, np.exp(x.astype(np.float64))).max() <= 2
    got = testing.vector_exp(isa, EXP_EDGES)
    assert got[0] == 1 and got[1] == 1
    assert np.all(np.isinf(got[2:5])) and np.all(got[2:5] > 0)
    assert np.all(got[5:8] == 0) and np.isnan(got[8])


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(SUPPORTED), reason="needs a CPU with AVX2 and AVX-512")
def test_exp_and_silu_are_the_same_at_avx2_and_avx512():
    """Bit-equal across widths: the same float32 operations per lane, and AVX2's 2^n as two exact power-of-two
    factors rounds once, as AVX-512's scalef does (csrc/simd.h), subnormal results included."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(-110, 100, 50_001), np.linspace(-104, -87, 3001), EXP_EDGES]).astype(np.float32)
    assert np.array_equal(testing.vector_exp("avx2", x), testing.vector_exp("avx512", x), equal_nan=True)
    g, u = (rng.standard_normal(1001) * 8).astype(np.float32), rng.standard_normal(1001).astype(np.float32)
    assert np.array_equal(testing.vector_silu_mul("avx2", g, u), testing.vector_silu_mul("avx512", g, u))


@pytest.mark.parametrize("isa", levels())
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 1000])
@pytest.mark.parametrize("with_up", [False, True])
def test_silu_mul_matches_float64(isa, n, with_up):
    g = torch.Generator().manual_seed(n)
    gate, up = torch.randn(n, generator=g) * 6, torch.randn(n, generator=g)
    got = torch.from_numpy(testing.vector_silu_mul(isa, gate.numpy(), up.numpy() if with_up else None))
    exact = torch.nn.functional.silu(gate.double()) * (up.double() if with_up else 1)
    # exp within 2 ulp (<= 4 2^-24 relative), then an add, a division and a product each rounding once
    torch.testing.assert_close(got.double(), exact, rtol=8 * 2**-24, atol=1e-30)


@pytest.mark.parametrize("isa", levels())
@pytest.mark.parametrize(("length", "d"), [(1, 1), (3, 7), (5, 8), (9, 16), (13, 33), (40, 64), (129, 80)])
def test_attention_head_matches_float64(isa, length, d):
    """One head: odd head sizes (vector tails) and lengths, a poisoned output."""
    g = torch.Generator().manual_seed(length * 100 + d)
    q, keys, values = torch.randn(d, generator=g), torch.randn(length, d, generator=g), torch.randn(length, d)
    scale = d**-0.5
    out = np.full(d, np.nan, dtype=np.float32)
    testing.attend_head(isa, q.numpy(), keys.numpy(), values.numpy(), scale, out)
    weights = torch.softmax(keys.double() @ q.double() * scale, dim=0)
    exact = weights @ values.double()
    # The scores: float32 dots of d terms, each within d 2^-24 |q||k| of the exact (times the scale). Through the
    # softmax a score error e changes a weight by a factor within exp(+-2e); the weights' own float32 steps (the
    # difference to the top score, exp within 2 ulp, the total of `length` terms, a division) add
    # (spread + length + 8) 2^-24 relative, spread being the largest difference to the top score; the output's
    # `length` fused multiply-adds add length 2^-24 of sum_t |p_t v_t|.
    scores = keys.double() @ q.double() * scale
    score_error = d * 2**-24 * float((keys.double().abs() @ q.double().abs()).max()) * scale
    spread = float(scores.max() - scores.min())
    magnitude = weights @ values.double().abs()
    bound = (2 * score_error + (spread + 2 * length + 8) * 2**-24) * magnitude
    error = (torch.from_numpy(out).double() - exact).abs()
    assert torch.all(error <= bound), float((error / bound).max())

"""The int8 vocabulary screen (csrc/int8_products.h, csrc/int8_kernels.h): its kernel against the plain C++ reference
and a numpy reference of the quantisation, its bound against float64 logits, and its ids against the dense float32
argmax, at every level this CPU runs that has the kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_engine import native
from calm_engine.engine.step import native_step as cpu_step
from tests.engine.screen_cases import assert_pool_size_ids, pool_size_case

testing = getattr(native.calm_cpu, "testing", None)
pytestmark = pytest.mark.skipif(
    testing is None or not hasattr(testing, "int8_scores"), reason="calm_engine._calm_cpu is not built"
)
SUPPORTED = cpu_step.supported_isas()


def _level(isa: str):
    """isa as a test parameter, skipped where this CPU does not run it or the level has no int8 kernel."""
    runs = isa in SUPPORTED and testing is not None and hasattr(testing, "has_int8_screen")
    reason = None if runs and testing.has_int8_screen(isa) else f"no int8 screen at {isa} on this CPU"
    return pytest.param(isa, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


LEVELS = [_level(isa) for isa in cpu_step.ISA_LEVELS[1:]]  # generic: no int8 kernel
TINY = np.float32(1e-30)
UNIT = 2.0**-24


def norms(weight: torch.Tensor) -> np.ndarray:
    return cpu_step.projection_row_norms(weight).numpy()


def kernel_scores(isa, x, weight, c0, n, reference):
    """(scores, bounds) [R, n] written into buffers poisoned with NaN and huge values."""
    scores = np.full((x.shape[0], n), np.nan, np.float32)
    bounds = np.full((x.shape[0], n), 3e38, np.float32)
    testing.int8_scores(isa, x.numpy(), weight.numpy(), norms(weight), c0, n, scores, bounds, reference)
    return scores, bounds


def rounded_up(value: np.ndarray) -> np.ndarray:
    f = value.astype(np.float32)
    return np.where(f.astype(np.float64) >= value, f, np.nextafter(f, np.float32(np.inf)))


def numpy_reference(x: torch.Tensor, weight: torch.Tensor):
    """The scores (bit for bit) and bounds (to float64 summation order) as int8_products.h defines them."""
    x, w = x.numpy(), weight.numpy()
    s_w = np.abs(w).max(1) / np.float32(127)
    q_w = np.clip(np.rint(w / np.where(s_w == 0, 1, s_w)[:, None]), -127, 127).astype(np.int64)
    s_x = np.abs(x).max(1) / np.float32(63)
    q_x = np.clip(np.rint(x / np.where(s_x == 0, 1, s_x)[:, None]), -63, 63).astype(np.int64)
    dots = (q_x @ q_w.T).astype(np.float32)
    scores = (s_x[:, None] * s_w[None, :]) * dots
    x_hat = s_x[:, None].astype(np.float64) * q_x
    residual = rounded_up(np.linalg.norm(w - s_w[:, None].astype(np.float64) * q_w, axis=1) * (1 + 1e-6))
    in_ = x.shape[1]
    gamma, slack = in_ * UNIT / (1 - in_ * UNIT), 1.01 * (1 + 1e-6)
    x_error, hat, norm = np.linalg.norm(x - x_hat, axis=1), np.linalg.norm(x_hat, axis=1), np.linalg.norm(x, axis=1)
    a = rounded_up(slack * (x_error + 4 * UNIT * hat + gamma * norm))
    b = rounded_up(slack * (1 + 4 * UNIT) * hat)
    bounds = a[:, None] * norms(weight)[None, :] + (b[:, None] * residual[None, :] + TINY)
    return scores, bounds


def random_case(seed: int, rows: int, vocab: int, width: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    weight = torch.randn(vocab, width, generator=generator) * torch.rand(vocab, 1, generator=generator)
    return x, weight


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize(("rows", "vocab", "width", "c0"), [(1, 17, 1, 0), (3, 700, 7, 16), (5, 1001, 131, 32),
                                                             (9, 333, 256, 64), (13, 4099, 130, 4000)])  # fmt: skip
def test_int8_kernel_matches_the_references(rows, vocab, width, c0, isa):
    seed = int(np.random.SeedSequence().generate_state(1)[0])  # a fresh seed each run, shown on failure
    x, weight = random_case(seed, rows, vocab, width)
    x[rows // 2] = 0  # a zero row: zero scale, every score 0
    weight[c0 + 1] = 0
    n = vocab - c0 - (vocab - c0) % 3  # a partial last group
    scores, bounds = kernel_scores(isa, x, weight, c0, n, reference=False)
    ref_scores, ref_bounds = kernel_scores(isa, x, weight, c0, n, reference=True)
    assert np.array_equal(scores, ref_scores), f"seed {seed}"
    assert np.array_equal(bounds, ref_bounds), f"seed {seed}"
    np_scores, np_bounds = numpy_reference(x, weight)
    assert np.array_equal(scores, np_scores[:, c0 : c0 + n]), f"seed {seed}"
    np.testing.assert_allclose(bounds, np_bounds[:, c0 : c0 + n], rtol=1e-6, err_msg=f"seed {seed}")


@pytest.mark.parametrize("isa", LEVELS)
def test_int8_bound_holds_against_float64_and_float32_logits(isa):
    """Observed error / bound <= 1 over rows of many kinds: Gaussian at scales 1e-6..1e6, heavy-tailed, sparse, one
    spike, constant; the bound covers the float32 logits' own rounding too."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
    width, vocab = 96, 2000
    weight = torch.randn(vocab, width, generator=generator) * torch.logspace(-4, 2, vocab)[:, None]
    weight[::7] = torch.distributions.StudentT(1.5).sample((len(range(0, vocab, 7)), width))
    kinds = [
        torch.randn(64, width, generator=generator) * torch.logspace(-6, 6, 64)[:, None],
        torch.distributions.StudentT(1.2).sample((32, width)),
        torch.randn(32, width, generator=generator) * (torch.rand(32, width, generator=generator) < 0.05),
        torch.eye(width)[:16] * 1e3 + 1e-3 * torch.randn(16, width, generator=generator),
        torch.full((4, width), 0.7),
    ]
    x = torch.cat(kinds)
    scores, bounds = kernel_scores(isa, x, weight, 0, vocab, reference=False)
    exact = (x.double() @ weight.double().T).numpy()
    single = (x @ weight.T).double().numpy()
    assert np.all(np.abs(scores - exact) <= bounds) and np.all(np.abs(scores - single) <= bounds)
    ratio = np.abs(scores - exact) / bounds
    assert ratio.max() <= 1 and ratio.max() > 0.05  # the bound is not vacuous either


def screened(isa, x, weight):
    ids, fallback, candidates = testing.int8_screened_vocab_argmax(isa, x.numpy(), weight.numpy(), norms(weight))
    return torch.from_numpy(ids), fallback, torch.from_numpy(candidates)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize(("rows", "vocab", "width"), [(1, 700, 32), (3, 1001, 7), (7, 2999, 33), (17, 3001, 129),
                                                      (32, 8192, 128), (40, 1531, 256)])  # fmt: skip
def test_int8_screen_matches_the_argmax_on_random_inputs(rows, vocab, width, isa):
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    x, weight = random_case(seed, rows, vocab, width)
    ids, fallback, candidates = screened(isa, x, weight)
    assert fallback == 0, f"seed {seed}"
    assert torch.equal(ids, (x.double() @ weight.double().T).argmax(-1)), f"seed {seed}"
    assert (candidates >= 1).all()


@pytest.mark.parametrize("isa", LEVELS)
def test_int8_screen_matches_the_dense_float32_argmax_at_pool_size(isa):
    """screen_cases' pool-size case: 800 rows over 8192 ids, random rows, near-ties a few ulps apart, exact
    ties of equal projection rows (the first id wins)."""
    x, weight, targets = pool_size_case(29)
    ids, fallback, candidates = screened(isa, x, weight)
    assert fallback == 0
    assert_pool_size_ids(ids, candidates, x, weight, targets)
    assert candidates[400:].float().mean() < 16


@pytest.mark.parametrize("isa", LEVELS)
def test_int8_screen_falls_back_per_row(isa):
    """600 equal projection rows (more than the 512 candidates a row keeps) that row 1 aims at, a non-finite row 3,
    a zero row 4 (every logit ties at 0): only those rows go to the float32 projection, with the first id."""
    generator = torch.Generator().manual_seed(31)
    vocab, width = 3000, 64
    weight = torch.randn(vocab, width, generator=generator)
    weight[1000:1600] = weight[1000]
    x = torch.randn(6, width, generator=generator)
    x[1] = 5 * weight[1000]
    x[3, 9] = float("nan")
    x[4] = 0
    ids, fallback, _ = screened(isa, x, weight)
    assert fallback == 3
    assert ids[1] == 1000 and ids[4] == 0
    keep = torch.tensor([0, 2, 5])
    assert torch.equal(ids[keep], (x[keep].double() @ weight.double().T).argmax(-1))


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("bad", [float("inf"), 3e38])
def test_int8_screen_leaves_non_finite_or_huge_rows_open(bad, isa):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 64, generator=generator)
    x[2, 7] = bad
    weight = torch.randn(900, 64, generator=generator)
    ids, fallback, _ = screened(isa, x, weight)
    assert fallback == 1
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(ids[keep], (x[keep].double() @ weight.double().T).argmax(-1))


@pytest.mark.parametrize("isa", LEVELS)
def test_int8_screen_refuses_inputs_wider_than_its_exact_sums(isa):
    with pytest.raises(ValueError, match="in <= 2048"):
        screened(isa, torch.randn(2, 2049), torch.randn(20, 2049))

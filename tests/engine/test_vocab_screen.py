"""The bfloat16-screened vocabulary argmax (csrc/vocab_screen.h) against the float64 argmax, at every instruction-set
level this CPU runs and from every source of the screen's products."""

from __future__ import annotations

import pytest
import torch

from calm_engine import native
from calm_engine.engine.step import native_step as cpu_step
from tests.engine.screen_cases import assert_pool_size_ids, pool_size_case

_calm_cpu = native.calm_cpu
testing = getattr(_calm_cpu, "testing", None)  # the step's kernels one by one (csrc/test_bindings.cpp)
BLAS = cpu_step.torch_blas_addresses()
SUPPORTED = cpu_step.supported_isas()
pytestmark = pytest.mark.skipif(
    _calm_cpu is None or not hasattr(_calm_cpu, "supported_isas"), reason="calm_engine._calm_cpu is not built"
)
HAS_GEMM = BLAS is not None and BLAS.gemm_bf16 is not None


def _skip_reason(isa: str, packed: bool) -> str | None:
    if isa not in SUPPORTED:
        return f"this CPU does not run {isa}"
    if not packed and not HAS_GEMM:
        return "torch's MKL has no bfloat16 GEMM"
    return None


def _source(isa: str, packed: bool):
    """(isa, packed) as a test parameter, skipped where this CPU or torch's MKL cannot run it."""
    reason = _skip_reason(isa, packed)
    kernel = {"avx2": "widened", "avx512": "widened", "avx512_bf16": "vdpbf16ps", "amx": "tiles"}
    name = f"{isa}-{kernel[isa] if packed else 'gemm'}"
    return pytest.param(isa, packed, id=name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


# The scan at every level with MKL's products, and each level's packed kernel: float32 FMAs on the widened bfloat16
# values (avx2, avx512), vdpbf16ps (avx512_bf16), AMX tiles (amx).
SOURCE_LIST = [("generic", False), ("avx2", False)] + [(isa, True) for isa in cpu_step.ISA_LEVELS[1:]]
SOURCES = [_source(isa, packed) for isa, packed in SOURCE_LIST]


def screened_with_candidates(x: torch.Tensor, weight: torch.Tensor, isa: str, packed: bool, tile: int = 512):
    """(ids [R], rows left to the full projection, candidates recomputed in float32 per row [R])."""
    bits, norms = cpu_step.bfloat16_bits(weight), cpu_step.projection_row_norms(weight).numpy()
    gemm = BLAS.gemm_bf16 if HAS_GEMM else 0
    ids, fallback, candidates = testing.screened_vocab_argmax(
        isa, gemm, x.numpy(), weight.numpy(), bits, norms, tile, packed
    )
    return torch.from_numpy(ids), fallback, torch.from_numpy(candidates)


def screened(x: torch.Tensor, weight: torch.Tensor, isa: str, packed: bool, tile: int = 512):
    return screened_with_candidates(x, weight, isa, packed, tile)[:2]


def width_unsupported(isa: str, packed: bool, width: int) -> bool:
    """vdpbf16ps needs an even width, AMX whole 32s (the step then keeps MKL's GEMM); the widened kernels any."""
    return packed and width % {"avx512_bf16": 2, "amx": 32}.get(isa, 1) != 0


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).argmax(-1)  # float64: no near-tie is decided by rounding here


@pytest.mark.parametrize(
    ("rows", "vocab", "width", "tile"),
    [(1, 700, 32, 512), (3, 1001, 7, 512), (7, 2999, 33, 512), (9, 2999, 34, 512), (17, 3001, 64, 512),
     (32, 8192, 128, 256)],
)  # fmt: skip
@pytest.mark.parametrize(("isa", "packed"), SOURCES)
def test_screen_matches_the_float64_argmax_on_random_inputs(rows, vocab, width, tile, isa, packed):
    if width_unsupported(isa, packed, width):
        pytest.skip("this packed screen needs an even width (AVX512-BF16) or whole 32s (AMX)")
    generator = torch.Generator().manual_seed(rows * vocab + width)
    # Rows of very different scales, so the bound has to scale with each row and each weight.
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    weight = torch.randn(vocab, width, generator=generator) * torch.rand(vocab, 1, generator=generator)
    ids, fallback = screened(x, weight, isa, packed, tile)
    assert fallback == 0
    assert torch.equal(ids, reference(x, weight))


@pytest.mark.parametrize(("isa", "packed"), SOURCES)
def test_screen_separates_ids_that_bfloat16_cannot(isa, packed):
    """Twenty rows differ from one another by less than bfloat16 resolves: the screen keeps them all as candidates and
    the float32 recomputation picks the true maximum, where the bfloat16 logits alone often pick another."""
    generator = torch.Generator().manual_seed(11)
    rows, vocab, width = 16, 1500, 64  # width: whole AMX tiles
    direction = torch.randn(width, generator=generator)
    x = direction + 0.05 * torch.randn(rows, width, generator=generator)
    weight = 0.3 * torch.randn(vocab, width, generator=generator)
    group = torch.randperm(vocab, generator=generator)[:20]
    weight[group] = direction + 1e-4 * torch.randn(20, width, generator=generator)
    expected = reference(x, weight)
    assert set(expected.tolist()) <= set(group.tolist())
    bfloat16_ids = (x.bfloat16().float() @ weight.bfloat16().float().T).argmax(-1)
    assert not torch.equal(bfloat16_ids, expected)  # the case is hard: bfloat16 alone gets it wrong
    ids, fallback = screened(x, weight, isa, packed)
    assert fallback == 0
    assert torch.equal(ids, expected)


@pytest.mark.parametrize(("isa", "packed"), SOURCES)
def test_screen_keeps_the_first_of_exactly_tied_ids(isa, packed):
    """Three equal rows of the projection, the largest logit of every x row, in different 512-id tiles: their float32
    recomputations are the same bits (the same sum over the same values), and the first id wins."""
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(1700, 64, generator=generator)
    weight[[90, 700, 1601]] = 3 * torch.randn(64, generator=generator)
    x = weight[90] + 0.1 * torch.randn(5, 64, generator=generator)
    assert torch.equal(reference(x, weight), torch.full((5,), 90))
    ids, fallback = screened(x, weight, isa, packed)
    assert fallback == 0
    assert torch.equal(ids, torch.full((5,), 90))


@pytest.mark.parametrize(("isa", "packed"), SOURCES)
def test_screen_leaves_rows_with_too_many_ties_to_the_full_projection(isa, packed):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 64, generator=generator).expand(1000, 64).contiguous()  # every logit ties
    x = torch.randn(3, 64, generator=generator)
    ids, fallback = screened(x, weight, isa, packed)
    assert fallback == 3
    assert torch.equal(ids, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(("isa", "packed"), SOURCES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_screen_leaves_non_finite_or_huge_rows_to_the_full_projection(bad, isa, packed):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 64, generator=generator)
    x[2, 7] = bad
    weight = torch.randn(900, 64, generator=generator)
    ids, fallback = screened(x, weight, isa, packed)
    assert fallback == 1
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(ids[keep], reference(x[keep], weight))


def test_screen_ids_are_the_same_from_every_source():
    """Bit-equal ids however the screen's products were computed: each source only decides which candidates reach
    the float32 recomputation, which is the same code for all and always includes its own argmax (the bound), so
    near-ties are decided identically. Rows of near-tied ids make the candidate sets differ between sources."""
    generator = torch.Generator().manual_seed(17)
    rows, vocab, width = 12, 2048, 64
    direction = torch.randn(width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator)
    weight[::97] = direction + 1e-5 * torch.randn(len(range(0, vocab, 97)), width, generator=generator)
    x = direction + 0.01 * torch.randn(rows, width, generator=generator)
    runs = [(isa, packed) for isa, packed in SOURCE_LIST if _skip_reason(isa, packed) is None]
    results = [screened(x, weight, isa, packed) for isa, packed in runs]
    for ids, fallback in results:
        assert fallback == 0 and torch.equal(ids, results[0][0])


@pytest.mark.parametrize("bad", [float("nan"), 1e31])
def test_screen_refuses_projection_rows_it_cannot_bound(bad):
    weight = torch.randn(600, 16)
    weight[123, 4] = bad
    with pytest.raises(ValueError, match="finite"):
        screened(torch.randn(2, 16), weight, SUPPORTED[-1], packed=SUPPORTED[-1] != "generic")


@pytest.mark.parametrize(("isa", "packed"), SOURCES)
def test_screen_matches_the_dense_float32_argmax_at_pool_size(isa, packed):
    """screen_cases' pool-size case (near-ties, exact ties, random rows) at every source of the products."""
    x, weight, targets = pool_size_case(23)
    ids, fallback, candidates = screened_with_candidates(x, weight, isa, packed)
    assert fallback == 0
    assert_pool_size_ids(ids, candidates, x, weight, targets)
    assert candidates[400:].float().mean() < 4  # random rows: the screen leaves a few ids (2.0 at AMX), not 64

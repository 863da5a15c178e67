"""The bfloat16-screened vocabulary argmax (csrc/vocab_screen.h) against the float32 argmax of torch."""

from __future__ import annotations

import pytest
import torch

from calm_engine.engine import cpu_step

_calm_cpu = cpu_step.model_runner._calm_cpu
BLAS = cpu_step.torch_blas_addresses()
pytestmark = pytest.mark.skipif(
    _calm_cpu is None or BLAS is None or BLAS.gemm_bf16 is None,
    reason="calm_engine._calm_cpu is not built or torch's MKL has no bfloat16 GEMM",
)


# The screen's bfloat16 products from MKL's GEMM, and from the packed copy with the AVX512-BF16 kernel and on AMX
# tiles, where the CPU has them.
PACKED = [False]
if _calm_cpu is not None and _calm_cpu.bf16_kernel_supported():
    PACKED.append(True)
    if _calm_cpu.amx_supported():
        PACKED.append("amx")


def screened(x: torch.Tensor, weight: torch.Tensor, tile: int = 512, packed=False) -> tuple[torch.Tensor, int]:
    bits, norms = cpu_step.bfloat16_bits(weight), cpu_step.projection_row_norms(weight).numpy()
    args = (BLAS.gemm_bf16, x.numpy(), weight.numpy(), bits, norms, tile)
    ids, fallback = _calm_cpu.screened_vocab_argmax(*args, packed=bool(packed), amx=packed == "amx")
    return torch.from_numpy(ids), fallback


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).argmax(-1)  # float64: no near-tie is decided by rounding here


@pytest.mark.parametrize(
    ("rows", "vocab", "width", "tile"),
    [(1, 700, 32, 512), (7, 2999, 33, 512), (9, 2999, 34, 512), (17, 3001, 64, 512), (32, 8192, 128, 256)],
)
@pytest.mark.parametrize("packed", PACKED)
def test_screen_matches_the_float32_argmax_on_random_inputs(rows, vocab, width, tile, packed):
    if packed and width % (32 if packed == "amx" else 2):
        pytest.skip("the packed screen needs an even width, AMX a multiple of 32 (the step then keeps MKL's GEMM)")
    generator = torch.Generator().manual_seed(rows * vocab + width)
    # Rows of very different scales, so the bound has to scale with each row and each weight.
    x = torch.randn(rows, width, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    weight = torch.randn(vocab, width, generator=generator) * torch.rand(vocab, 1, generator=generator)
    ids, fallback = screened(x, weight, tile, packed)
    assert fallback == 0
    assert torch.equal(ids, reference(x, weight))


@pytest.mark.parametrize("packed", PACKED)
def test_screen_separates_ids_that_bfloat16_cannot(packed):
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
    ids, fallback = screened(x, weight, packed=packed)
    assert fallback == 0
    assert torch.equal(ids, expected)


@pytest.mark.parametrize("packed", PACKED)
def test_screen_leaves_rows_with_too_many_ties_to_the_full_projection(packed):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 64, generator=generator).expand(1000, 64).contiguous()  # every logit ties
    x = torch.randn(3, 64, generator=generator)
    ids, fallback = screened(x, weight, packed=packed)
    assert fallback == 3
    assert torch.equal(ids, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_screen_leaves_non_finite_or_huge_rows_to_the_full_projection(bad, packed):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 64, generator=generator)
    x[2, 7] = bad
    weight = torch.randn(900, 64, generator=generator)
    ids, fallback = screened(x, weight, packed=packed)
    assert fallback == 1
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(ids[keep], reference(x[keep], weight))


@pytest.mark.parametrize("bad", [float("nan"), 1e31])
def test_screen_refuses_projection_rows_it_cannot_bound(bad):
    weight = torch.randn(600, 16)
    weight[123, 4] = bad
    with pytest.raises(ValueError, match="finite"):
        screened(torch.randn(2, 16), weight)

"""uniform_noise: kernel == reference bit for bit, Random123 known answers, tl.rand's conversion, statistics."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.philox import philox4x32_ref, uniform_noise, uniform_noise_ref

from tests.kernels.cases import NOISE_SIZES, PHILOX_SEEDS
from tests.kernels.conftest import DEVICE, needs_triton, poisoned

# Philox4x32-10 known answers of the Random123 distribution (kat_vectors): (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _philox_scalar(counter, key, rounds=10):
    """Philox4x32 written from the spec with Python ints: independent of the tensor reference."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _int32(words):
    return torch.tensor([[w - 2**32 if w >= 2**31 else w for w in words]], dtype=torch.int32)


def _ref_words(counter, key):
    words = philox4x32_ref(tuple(_int32([c]) for c in counter), tuple(torch.tensor([[k]]) for k in key))
    return tuple(int(w) & 0xFFFFFFFF for w in words)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    assert _philox_scalar(counter, key) == expected
    assert _ref_words(counter, key) == expected


def test_reference_matches_scalar_spec_on_random_words():
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        words = torch.randint(0, 2**32, (6,), generator=generator).tolist()
        counter, key = tuple(words[:4]), tuple(words[4:])
        assert _ref_words(counter, key) == _philox_scalar(counter, key)


def test_reference_is_the_documented_element_mapping():
    """Element (r, s, d): key = seeds[r] split low/high, counter (s*dim + d, steps[r], 0, 0), word 0 -> float."""
    seeds = torch.tensor([2**32 + 5, -1])
    steps = torch.tensor([3, 2**32 + 9])
    noise = uniform_noise_ref(seeds, steps, 3, 5)
    for r, s, d in [(0, 0, 0), (0, 2, 4), (1, 1, 3)]:
        seed = int(seeds[r]) & (2**64 - 1)
        word = _philox_scalar((s * 5 + d, int(steps[r]) & 0xFFFFFFFF, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))[0]
        signed = word - 2**32 if word >= 2**31 else word
        folded = -signed - 1 if signed < 0 else signed
        expected = torch.tensor(folded, dtype=torch.float32) * torch.tensor(4.6566127342e-10) - 0.5
        assert noise[r, s, d].item() == expected.item()


@needs_triton
@pytest.mark.parametrize("samples, dim", NOISE_SIZES)
def test_kernel_matches_reference_bitwise(samples, dim):
    seeds = torch.tensor(PHILOX_SEEDS, device=DEVICE)
    steps = torch.tensor([0, 1, 7, 2**31, 2**32 + 3, 5, 123456, 9, 0], device=DEVICE)
    out = uniform_noise(seeds, steps, samples, dim, out=poisoned(len(PHILOX_SEEDS), samples, dim))
    expected = uniform_noise_ref(seeds.cpu(), steps.cpu(), samples, dim)
    assert out.shape == (len(PHILOX_SEEDS), samples, dim) and out.dtype == torch.float32
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))
    assert out.min() >= -0.5 and out.max() < 0.5


@needs_triton
def test_conversion_is_tl_rand():
    """With step 0, noise + 0.5 is exactly tl.rand(seed, offsets): same counter (offset, 0, 0, 0), same float."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)

    for seed in (0, 12345, 2**40 + 1):
        expected = poisoned(100)
        rand_kernel[(1,)](expected, seed, 100, BLOCK=128)
        noise = uniform_noise_ref(torch.tensor([seed]), torch.tensor([0]), 10, 10).flatten()
        assert torch.equal((noise + 0.5).view(torch.int32), (expected.cpu() - 0.5 + 0.5).view(torch.int32))


@needs_triton
def test_same_seed_and_step_reproduce():
    seeds, steps = torch.tensor([42, 42], device=DEVICE), torch.tensor([5, 5], device=DEVICE)
    first = uniform_noise(seeds, steps, 9, 11)
    second = uniform_noise(seeds, steps, 9, 11)
    assert torch.equal(first, second) and torch.equal(first[0], first[1])
    assert torch.equal(uniform_noise_ref(seeds.cpu(), steps.cpu(), 9, 11), first.cpu())


def test_different_steps_and_seeds_are_independent_uniform():
    """Rows: one seed at steps 0..3, then seeds 1..3 (and a 2**32 apart seed) at step 0; n = 200 * 64 per row.

    For U(-1/2, 1/2): mean 0 with sd 1/sqrt(12 n) = 2.6e-3; mean square 1/12 with sd sqrt((1/80 - 1/144) / n)
    = 6.6e-4; Pearson correlation between two independent rows 0 with sd 1/sqrt(n) = 8.8e-3; the same for lag-1
    correlation inside a row. Thresholds are 5 sd: with 8 rows and 28 pairs, a false alarm would have probability
    below 1e-5 (the draws are fixed, so the test is deterministic anyway).
    """
    seeds = torch.tensor([9, 9, 9, 9, 1, 2, 3, 9 + 2**32])
    steps = torch.tensor([0, 1, 2, 3, 0, 0, 0, 0])
    noise = uniform_noise_ref(seeds, steps, 200, 64).reshape(8, -1).double()
    n = noise.shape[1]
    assert noise.mean(dim=1).abs().max() < 5 / (12 * n) ** 0.5
    assert (noise.pow(2).mean(dim=1) - 1 / 12).abs().max() < 5 * ((1 / 80 - 1 / 144) / n) ** 0.5
    correlation = torch.corrcoef(noise)
    off_diagonal = correlation[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / n**0.5
    lag1 = torch.stack([torch.corrcoef(torch.stack((row[:-1], row[1:])))[0, 1] for row in noise])
    assert lag1.abs().max() < 5 / n**0.5
    # Uniformity: 16 equal bins, chi-square with 15 dof; 5 sd above its mean of 15 is 15 + 5 * sqrt(30) = 42.
    counts = torch.histc(noise.flatten().float(), bins=16, min=-0.5, max=0.5)
    expected = noise.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 42


def test_validation_errors():
    with pytest.raises(ValueError, match="int64"):
        uniform_noise_ref(torch.tensor([1], dtype=torch.int32), torch.tensor([0]), 2, 2)
    with pytest.raises(ValueError, match="steps"):
        uniform_noise_ref(torch.tensor([1]), torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ValueError, match="samples"):
        uniform_noise_ref(torch.tensor([1]), torch.tensor([0]), 0, 2)

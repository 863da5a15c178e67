"""Counter-based uniform noise (Philox4x32-10) for the energy head: the same bits on GPU, interpreter and CPU.

Element (r, s, d) of `uniform_noise(seeds, steps, samples, dim)` is Philox4x32-10 with key = seeds[r] (low 32 bits
key0, high 32 bits key1, as `tl.philox` splits a 64-bit seed) and counter (s*dim + d, steps[r], 0, 0); the first
output word becomes a float in [0, 1) exactly as `tl.rand` converts it, minus 0.5. A request that keeps its seed and
counts its steps therefore reproduces its noise on any device, and the CPU reference is bit-identical to the kernel.
"""

from __future__ import annotations

import torch

from .utils import check_int, check_launch, jit, tl

PHILOX_ROUNDS = 10
PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key schedule increments
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
# tl.rand's uint32 -> [0, 1) scale: the largest float32 with (2**31 - 1) * scale < 1 after rounding.
UNIFORM_SCALE = 4.6566127342e-10
BLOCK = 1024  # elements per program; noise is tiny (200 x 64 per row), one or a few programs per row


@jit
def philox_uniform(seed, step, counter):
    """float32 uniform on [-0.5, 0.5) for a block of int32 counters; seed, step are int64 scalars.

    Shared by the noise kernel and the fused energy head so that both produce the same bits.
    """
    zero = tl.zeros_like(counter)
    word1 = zero + step.to(tl.uint32).to(tl.int32, bitcast=True)
    bits, _, _, _ = tl.philox(seed, counter, word1, zero, zero)
    return tl.random.uint_to_uniform_float(bits) - 0.5


@jit
def _uniform_noise_kernel(seeds_ptr, steps_ptr, out_ptr, per_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row)
    step = tl.load(steps_ptr + row).to(tl.int64)
    noise = philox_uniform(seed, step, offs)
    tl.store(out_ptr + row.to(tl.int64) * per_row + offs, noise, mask=offs < per_row)


def _check(seeds: torch.Tensor, steps: torch.Tensor, samples: int, dim: int) -> None:
    if seeds.dim() != 1:
        raise ValueError(f"uniform_noise: seeds must be a 1-D int64 tensor [R], got shape {list(seeds.shape)}")
    if seeds.dtype != torch.int64:
        raise ValueError(f"uniform_noise: seeds must be int64 (64-bit Philox keys), got {seeds.dtype}")
    check_int("uniform_noise", "steps", steps, tuple(seeds.shape))
    if steps.device != seeds.device:
        raise ValueError(f"uniform_noise: seeds on {seeds.device} but steps on {steps.device}")
    if samples < 1 or dim < 1:
        raise ValueError(f"uniform_noise: samples and dim must be >= 1, got samples={samples}, dim={dim}")
    if samples * dim >= 2**31:
        raise ValueError(f"uniform_noise: samples * dim = {samples * dim} exceeds the 32-bit counter")


def uniform_noise(
    seeds: torch.Tensor, steps: torch.Tensor, samples: int, dim: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """seeds, steps int64 [R] (device-resident, graph-capturable) -> float32 [R, samples, dim] uniform on [-0.5, 0.5).

    Floors (CALM-M, R=64 rows, 200 x 64 samples each): 3.3 MB written / bandwidth (0.7 us at 4.8 TB/s); about 60
    integer ops per element (10 Philox rounds) = 49 Mop, far below any ceiling. One launch; `out` is for tests.
    """
    _check(seeds, steps, samples, dim)
    rows, per_row = seeds.shape[0], samples * dim
    if out is None:
        out = torch.empty(rows, samples, dim, device=seeds.device, dtype=torch.float32)
    if rows == 0:
        return out
    check_launch(_uniform_noise_kernel, "uniform_noise", seeds, steps, out)
    grid = (rows, -(-per_row // BLOCK))
    # No fused multiply-add: (x * scale) - 0.5 must round twice, as in the reference and the interpreter.
    _uniform_noise_kernel[grid](seeds, steps, out, per_row, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out


def _mulhilo(multiplier: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 multiplier x word (int32 bit pattern) -> (high, low) words of the 64-bit product, as int32 patterns.

    The exact product is below 2**64, so int64 arithmetic (which wraps) holds its bits; a little-endian view then
    splits them without shifts. 3 tensor ops instead of the 11 of a 16-bit split.
    """
    product = (word.to(torch.int64) & MASK32) * multiplier
    halves = product.unsqueeze(-1).view(torch.int32)
    return halves[..., 1], halves[..., 0]


def philox4x32_ref(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int32 tensors holding the words' bit patterns (broadcasting); returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = (k.to(torch.int64) & MASK32 for k in key)
    for _ in range(rounds):
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        c0, c1, c2, c3 = hi1 ^ c1 ^ _as_int32(k0), lo1, hi0 ^ c3 ^ _as_int32(k1), lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same low 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def uniform_noise_ref(seeds: torch.Tensor, steps: torch.Tensor, samples: int, dim: int) -> torch.Tensor:
    """The same noise in plain torch (int arithmetic), bit-identical to `uniform_noise`; the engine's CPU source."""
    _check(seeds, steps, samples, dim)
    device = seeds.device
    key0 = (seeds & MASK32)[:, None]
    key1 = ((seeds >> 32) & MASK32)[:, None]  # arithmetic shift, then the mask keeps the 32 high bits
    c0 = torch.arange(samples * dim, device=device, dtype=torch.int32)[None, :]
    c1 = _as_int32(steps.to(torch.int64) & MASK32)[:, None]
    zero = torch.zeros(1, 1, device=device, dtype=torch.int32)
    bits, _, _, _ = philox4x32_ref((c0, c1, zero, zero), (key0, key1))
    bits = bits.expand(seeds.shape[0], samples * dim)  # keeps the full shape even for rows == 0
    # tl.rand: reinterpret as int32, fold negatives x -> -x - 1 (= x ^ -1), scale into [0, 1) in float32.
    folded = bits ^ (bits >> 31)
    uniform = folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=device)
    return (uniform - 0.5).reshape(seeds.shape[0], samples, dim)

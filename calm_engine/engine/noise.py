"""The noise of every draw: Philox4x32-10 uniforms keyed by (request seed, counter), and the counter layout.

A request's counter for generated chunk t, exact-sampler pool p and stream s (HEAD_NOISE: the energy head's noise,
CHOICE_UNIFORMS: the sampler's uniforms) is t * COUNTERS_PER_STEP + 2 * p + s (`counter`), so every draw of every
request has its own Philox counter and a seed reproduces its output whatever else runs in the batch. Within one
counter, element (sample, d) is Philox's counter word 0 = sample * dim + d (kernels/philox.py). This module is the one
place the layout is written; the PyTorch and graph steps, the token-level step and the C++ step all call `counter`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from calm_engine import native
from calm_engine.kernels.philox import uniform_noise, uniform_noise_ref

COUNTERS_PER_STEP = 64
MAX_POOLS = COUNTERS_PER_STEP // 2  # the exact sampler's pools per step that have counters of their own
HEAD_NOISE, CHOICE_UNIFORMS = 0, 1

# (seeds [R], counters [R], samples, dim) -> uniforms on [-0.5, 0.5) [R, samples, dim]
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def counter(steps, pool: int = 0, stream: int = HEAD_NOISE):
    """The Philox counter of generated chunk `steps` (a tensor, an array or an int), pool and stream."""
    return steps * COUNTERS_PER_STEP + 2 * pool + stream


def philox_noise(seeds: torch.Tensor, counters: torch.Tensor, samples: int, dim: int) -> torch.Tensor:
    """The default noise: Philox4x32-10 uniforms on [-0.5, 0.5) keyed by (seed, counter), [R, samples, dim].

    The Triton kernel on CUDA, the C++ loop of csrc/ on CPU when it is built, else the torch reference; all three
    are bit-identical, so a seed gives the same noise on every device.
    """
    if seeds.is_cuda:
        return uniform_noise(seeds, counters, samples, dim)
    if native.calm_cpu is not None and seeds.device.type == "cpu":
        return torch.from_numpy(native.calm_cpu.philox_uniform(seeds.numpy(), counters.numpy(), samples, dim))
    return uniform_noise_ref(seeds, counters, samples, dim)


def philox_noise_numpy(seeds: np.ndarray, counters: np.ndarray, samples: int, dim: int) -> np.ndarray:
    """philox_noise on int64 numpy arrays, for the C++ step: a tensor operation between two of its steps made the next
    step ~0.1 ms slower at batch 8 (small shape, AVX2 level)."""
    if native.calm_cpu is not None:
        return native.calm_cpu.philox_uniform(seeds, counters, samples, dim)
    return uniform_noise_ref(torch.from_numpy(seeds), torch.from_numpy(counters), samples, dim).numpy()

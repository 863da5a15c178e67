"""NativeStep: a whole T = 1 decode step (or prefill) of a float32 CALM model in one C++ call
(csrc/decode_step.cpp), the engine's fastest path for small batches on a CPU. At T < 1 the C++ step gives the rows'
hidden states, then draws and decodes each pool of N head samples in one call (csrc/sample_pool.cpp), and
pools.choose_from_pools chooses among them exactly as the PyTorch step does.

For small batches on a CPU the PyTorch step is ~120 operations whose dispatch costs about as much as the matrix
products (benchmarks/RESULTS.md). The C++ step reads the weights (ModelWeights, bound as the typed StepWeights of
native_weights.py) and the KV cache in place (numpy views, nothing copied). The PyTorch step is its reference
(tests/engine/test_cpu_step.py).

The step runs at an instruction-set level (ISA_LEVELS, csrc/isa.h): the highest this CPU supports (the extension
reads the CPU's features), or a lower one asked for with EngineConfig.cpu_isa or $CALM_CPU_ISA. At "generic" its
products go to the sgemm of the BLAS inside torch, found at run time, and its loops are plain C++; from "avx2" up its
products run on packed copies of the weights, each read as one stream (csrc/packed_linear.h), and its attention and
SiLU are vectorised (csrc/step_kernels.h), 8 floats per register at "avx2", 16 from "avx512" up.

The vocabulary argmax can go through a bfloat16 screen with a rigorous error bound and float32 recomputation of the
ids it leaves (csrc/vocab_screen.h; EngineConfig.screen_vocab): the float32 argmax, computed mostly in bfloat16. The
step keeps a bfloat16 copy of the projection's weight for it (half the weight's size): from "avx2" up packed for the
level's kernel, AMX tiles at "amx", vdpbf16ps at "avx512_bf16" (up to 8 rows, MKL's bfloat16 GEMM above), float32
fused multiply-adds on the widened bfloat16 values at "avx2" and "avx512"; at "generic" MKL's bfloat16 GEMM, where
torch exports it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calm_engine import native
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import NoiseFn, counter, philox_noise, philox_noise_numpy
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step.interface import Phase, StepBackend, StepResult, StepRow
from calm_engine.engine.step.native_weights import native_step_weights
from calm_engine.engine.step.pools import choose_from_pools, sampling_batch
from calm_engine.engine.weights import ModelWeights


@dataclass(frozen=True)
class BlasAddresses:
    """Entry points of the MKL inside torch's CPU library: the Fortran-interface sgemm_, MKL_Set_Num_Threads_Local
    and, where exported (else None), cblas_gemm_bf16bf16f32."""

    sgemm: int
    set_threads_local: int
    gemm_bf16: int | None


@functools.cache
def torch_blas_addresses() -> BlasAddresses | None:
    """torch's BLAS entry points, or None where its CPU library exports no sgemm_."""
    if not sys.platform.startswith("linux"):
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        handle = ctypes.CDLL(str(library))
    except OSError:
        return None

    def address(name: str) -> int | None:
        function = getattr(handle, name, None)
        return None if function is None else ctypes.cast(function, ctypes.c_void_p).value

    sgemm, set_threads_local = address("sgemm_"), address("MKL_Set_Num_Threads_Local")
    if sgemm is None or set_threads_local is None:
        return None
    return BlasAddresses(sgemm, set_threads_local, address("cblas_gemm_bf16bf16f32"))


# The C++ step's instruction-set levels, lowest first; each includes the ones before it (csrc/isa.h).
ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
ISA_ENV = "CALM_CPU_ISA"
# Where the vocabulary screen is on by default: at the levels whose kernels multiply bfloat16 natively, at "avx2",
# whose screen is int8 (csrc/int8_products.h), and at "avx512", where the packed bfloat16 copy halves the bytes the
# projection reads (benchmarks/RESULTS.md, "CPU instruction-set levels"). At "generic" MKL's bfloat16 GEMM would
# convert to float32 first.
SCREEN_BY_DEFAULT = {"generic": False, "avx2": True, "avx512": True, "avx512_bf16": True, "amx": True}


def supported_isas() -> tuple[str, ...]:
    """The levels this CPU runs, lowest first (("generic",) where the extension is not built)."""
    if not native.has("supported_isas"):
        return ("generic",)
    return tuple(native.calm_cpu.supported_isas())


def resolve_isa(isa: str | None = None, argument: str = "isa") -> str:
    """The level to run: `isa`, else $CALM_CPU_ISA, else the highest this CPU supports. ValueError for an unknown
    name or one this CPU cannot run, naming the levels it can (and `argument`, the name the caller gave `isa`)."""
    source = argument
    if isa is None and os.environ.get(ISA_ENV):
        isa, source = os.environ[ISA_ENV], f"${ISA_ENV}"
    supported = supported_isas()
    if isa is None:
        return supported[-1]
    if not isinstance(isa, str) or isa not in ISA_LEVELS:
        raise ValueError(
            f"{source}={isa!r} is not an instruction-set level: choose one of {', '.join(ISA_LEVELS)} "
            f"(this CPU runs {', '.join(supported)})"
        )
    if isa not in supported:
        raise ValueError(f"{source}={isa!r}: this CPU does not run that level; it runs {', '.join(supported)}")
    return isa


def bfloat16_bits(weight: torch.Tensor) -> np.ndarray:
    """A float32 weight rounded to bfloat16 (nearest even), as the uint16 bits the screen reads."""
    return np.ascontiguousarray(weight.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def projection_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the row norms of a weight [vocab, in] in float32, for the screen's error bound: the float32
    norm, whose relative error is at most about in * 2^-24, raised by in * 2^-21. Rows that overflow are inf."""
    return weight.detach().float().norm(dim=1).mul_(1 + weight.shape[1] * 2**-21)


def available(weights: ModelWeights) -> bool:
    """Whether the C++ step can run this model here: a float32 CALM model on CPU, the built extension, torch's sgemm."""
    return (
        native.has("DecodeStep")
        and weights.is_calm
        and weights.device.type == "cpu"
        and weights.dtype == torch.float32
        and torch_blas_addresses() is not None
    )


class NativeStep(StepBackend):
    """The C++ step: decode and prefill of rows at any temperature; a step of T = 1 rows alone (one head sample each)
    is one C++ call."""

    name = "native"

    def __init__(
        self,
        weights: ModelWeights,
        cache: SlotKVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        noise: NoiseFn = philox_noise,
        screen_vocab: bool | None = None,
        isa: str | None = None,
    ):
        """isa: the instruction-set level (ISA_LEVELS); None takes $CALM_CPU_ISA, else the highest this CPU runs.
        From "avx2" up the step keeps a packed copy of every weight but the embeddings and the vocabulary projection
        (18 MB on the small benchmark shape, 936 MB on CALM-M); at AVX-512 it ran the step 1.6x (small, batch 8) and
        1.7x (CALM-M, batch 8) faster than torch's sgemm (benchmarks/RESULTS.md). "generic" keeps the sgemm and no
        copy. `self.isa` is the level it runs.

        screen_vocab: the vocabulary argmax through the bfloat16 screen; None uses it where the level's default
        (SCREEN_BY_DEFAULT) says so and the projection has finite rows (norm below 1e30); True insists (an error
        where it cannot: non-finite rows, or "generic" without MKL's bfloat16 GEMM)."""
        if not available(weights):
            raise RuntimeError(
                "the C++ decode step needs a float32 CALM model on CPU, the built extension and torch's sgemm"
            )
        self.weights, self.cache, self.noise = weights, cache, noise
        self.device = weights.device
        self.choice_seconds = 0.0  # the last sample()'s time outside its pools: the counting and the choice
        self.chunk_size, self.noise_size = weights.shapes.chunk_size, weights.shapes.noise
        rope_cos, rope_sin = rope
        step_weights = native_step_weights(weights, cache.keys, cache.values, rope_cos, rope_sin)
        self.isa = resolve_isa(isa)
        blas = torch_blas_addresses()
        projection = weights.decoder.projection
        norms = projection_row_norms(projection)
        # Rows of norm 1e30 or more (or not finite) could overflow the screen's float32 sums. From "avx2" up the
        # level's own kernel computes the screen's products; at "generic" only MKL's GEMM can.
        products = blas.gemm_bf16 is not None or self.isa != "generic"
        screenable = products and bool(norms.max() < 1e30)
        if screen_vocab and not screenable:
            raise RuntimeError(
                "the C++ step: the vocabulary screen needs finite projection weights, and at the generic level "
                "torch's bfloat16 GEMM"
            )
        if screen_vocab is None:
            screen_vocab = screenable and SCREEN_BY_DEFAULT[self.isa]
        self.screen_vocab = screen_vocab
        screen = (blas.gemm_bf16 or 0, bfloat16_bits(projection), norms.numpy()) if self.screen_vocab else None
        # Two threads at most: the step's products are small, and the second thread spins while a step runs.
        threads = min(2, torch.get_num_threads())
        self._step = native.calm_cpu.DecodeStep(
            step_weights, blas.sgemm, blas.set_threads_local, threads, isa=self.isa, vocab_screen=screen
        )

    # ---- the StepBackend interface ----------------------------------------------------------------------------

    def supports(self, phase: Phase, rows: Sequence[StepRow]) -> bool:
        return True

    def decode(self, rows: Sequence[StepRow]) -> StepResult:
        k = self.chunk_size  # one numpy array for all the step's inputs: a step at batch 1 lasts ~0.7 ms
        table = np.array([[*r.last_chunk, r.next_position, r.slot, r.seed, r.chunks_done] for r in rows])
        ids, positions, slots = table[:, :k], table[:, k], table[:, k + 1]
        if all(r.params.samples_per_step == 1 for r in rows):
            return StepResult(self.run(ids, positions, slots, table[:, k + 2], table[:, k + 3]))
        return self.sample(self._step.decode_hidden(ids, positions, slots), sampling_batch(rows, self.device))

    def prefill(self, rows: Sequence[StepRow]) -> StepResult:
        keys = np.array([[r.seed, r.chunks_done] for r in rows], dtype=np.int64)  # the noise's (seed, step)
        prompts, slots = [r.fed_prompt for r in rows], [r.slot for r in rows]
        if all(r.params.samples_per_step == 1 for r in rows):
            return StepResult(self.prefill_prompts(prompts, slots, keys[:, 0], keys[:, 1]))
        hidden = self._step.prefill_hidden(*self._prefill_rows(prompts, slots))
        return self.sample(hidden, sampling_batch(rows, self.device))

    # ---- arrays -----------------------------------------------------------------------------------------------

    def run(self, ids, positions, slots, seeds, steps) -> torch.Tensor:
        """ids [B, K] at chunk positions [B] in slots [B] -> the next chunk [B, K], sampled at T = 1 with the
        noise of (seed, step) exactly as TorchStep.sample draws it. Integer CPU tensors or numpy arrays
        (the engine passes numpy: at batch 1 a step lasts ~0.7 ms, and each tensor built costs ~20 us)."""
        out = self._step.run(np.asarray(ids), np.asarray(positions), np.asarray(slots), self._t1_noise(seeds, steps))
        return torch.from_numpy(out)

    def prefill_prompts(self, prompts: list[list[int]], slots: list[int], seeds, steps) -> torch.Tensor:
        """Prompts of whole chunks (token ids, K per chunk) into cache slots, every chunk at its position -> the
        first generated chunk of each [B, K] at T = 1: TorchStep.prefill_hidden followed by sample."""
        out = self._step.prefill(*self._prefill_rows(prompts, slots), self._t1_noise(seeds, steps))
        return torch.from_numpy(out)

    def sample(self, hidden: np.ndarray, batch: SamplingBatch) -> StepResult:
        """hidden [B, H] (the C++ step's) -> every row's next chunk [B, K] as TorchStep.sample gives it: each pool
        drawn and decoded in one C++ call (sample_pool), the choice by pools.choose_from_pools."""
        samples, start, drawing = batch.valid.shape[1], time.perf_counter(), 0.0

        def draw_pool(counters: torch.Tensor) -> torch.Tensor:
            nonlocal drawing
            begin = time.perf_counter()
            pool = self.sample_pool(hidden, batch.seeds.numpy(), counters.numpy(), samples)
            drawing += time.perf_counter() - begin
            return pool

        # The choice's tensor operations on one thread: a parallel region of torch's OpenMP leaves its threads spinning
        # on the cores the C++ step's two threads need (small shape, T = 0.5, batch 1: 8.0-8.3 ms steps, 6.6 ms thus).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = choose_from_pools(batch, draw_pool, self.noise, self.chunk_size, allow_sync=True)
        finally:
            torch.set_num_threads(threads)
        self.choice_seconds = time.perf_counter() - start - drawing
        return result

    def sample_pool(self, hidden: np.ndarray, seeds, counters, samples: int) -> torch.Tensor:
        """hidden [B, H] -> S head samples per row decoded to chunks [B, S, K], with the noise of (seed, counter), as
        TorchStep.sample_pool draws them."""
        noise = self._noise(seeds, counters, samples)
        return torch.from_numpy(self._step.sample_pool(np.asarray(hidden), noise))

    def _prefill_rows(self, prompts: list[list[int]], slots: list[int]):
        """ids [R, K], positions [R], slots [R] of every prompt chunk, and last [B], the row of each prompt's last."""
        # numpy, not torch: torch.repeat_interleave runs a parallel region whose idle OpenMP thread then spins
        # through the step on the core its second thread needs (a 64-chunk prefill took 7.4 instead of 4.8 ms).
        k = self.chunk_size
        chunks = np.array([len(prompt) // k for prompt in prompts], dtype=np.int64)
        ids = np.array([token for prompt in prompts for token in prompt], dtype=np.int64).reshape(-1, k)
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in chunks])
        rows_slot = np.repeat(np.asarray(slots, dtype=np.int64), chunks)
        return ids, positions, rows_slot, np.cumsum(chunks) - 1

    @property
    def pool_stats(self) -> dict:
        """What the last pool spent (seconds in the head, the decoder MLP and the vocabulary argmax) and the screen's
        work on it (rows, candidates recomputed in float32, rows projected in full)."""
        return self._step.pool_stats

    @property
    def screen_fallback_rows(self) -> int:
        """Rows of the last call's vocabulary argmax that the screen left open and the step projected in full."""
        return self._step.screen_fallback_rows

    def _t1_noise(self, seeds, steps) -> np.ndarray:
        """The noise [B, noise] of each row's (seed, step) at T = 1."""
        return self._noise(seeds, counter(np.asarray(steps, dtype=np.int64)), 1)[:, 0]

    def _noise(self, seeds, counters, samples: int) -> np.ndarray:
        """The head noise [B, samples, noise] of each row's (seed, Philox counter), as TorchStep draws it."""
        seeds, counters = np.asarray(seeds, dtype=np.int64), np.asarray(counters, dtype=np.int64)
        if self.noise is philox_noise:
            return philox_noise_numpy(seeds, counters, samples, self.noise_size)
        noise = self.noise(torch.from_numpy(seeds), torch.from_numpy(counters), samples, self.noise_size)
        return np.ascontiguousarray(noise.numpy(), dtype=np.float32)

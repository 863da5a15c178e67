"""EngineConfig: every option of an engine, validated once at construction (LLM(**kwargs) and LLMEngine(model,
**kwargs) build one; an unknown keyword is a TypeError naming it).

What the options resolve to on this machine and model (device, dtype, backends, the C++ step's instruction-set level,
graph buckets) is logged at INFO when the engine starts (LLMEngine.describe(); `calm generate --verbose` prints it).
Hidden switches are none: the only environment variable the engine reads is $CALM_CPU_ISA, the default of cpu_isa
(the C++ extension itself asks the CPU which levels it runs); TRITON_INTERPRET is triton's own.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from calm_engine.engine.noise import NoiseFn

PROMPT_PADDING = ("right", "left")
STEP_BACKENDS = ("auto", "torch", "native", "graph")
# Default budget for one step's pool of head samples (the rows of a step times the largest num_samples among them;
# see llm_engine.sample_row_bytes). 2 GiB holds 64 requests x 200 samples of the default model (0.15 GiB) and of
# CALM-M (0.45 GiB), and refuses at once what would otherwise exhaust memory (issue 16 reported a request of 100,000
# samples on the default model that took 5.4 GB before the pool was decoded in blocks; it now takes about 0.6 GB).
SAMPLE_POOL_MEMORY = 2 << 30
# Up to this many rows the C++ step beats the PyTorch path (small shape, 2 threads, generate of 64 tokens, the two
# alternated: 2.17x at 16 rows, 1.66x at 32, 1.33x at 64; benchmarks/RESULTS.md). Larger batches were not measured.
CPU_STEP_MAX_BATCH = 64
# Prefills of at most this many chunks in all run as the C++ step too; above it the PyTorch path's threaded attention
# and large products win (first step, small shape, 2 threads, C++ / PyTorch: 1 x 128 chunks 12.2 / 15.4 ms, 2 x 128
# 23.7 / 24.8, 4 x 128 50.2 / 44.5, 8 x 128 94.6 / 67.4; benchmarks/prefill_ab.py).
CPU_PREFILL_MAX_CHUNKS = 256
# Steps of at most this many head samples (rows x the largest num_samples) run as the C++ step at T < 1 too. Up to
# the largest batch the C++ step takes it wins (small shape, T = 0.5, N = 200, 2 threads, `amx`, C++ / PyTorch ms per
# step: batch 16 86-96 / 162-176, 32 184-193 / 301-359, 64 355-396 / 635-656; benchmarks/RESULTS.md, issue 20).
CPU_POOL_MAX_DRAWS = 64 * 200


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs a model.

    Batching and memory:
      max_batch_size: requests decoded together (one KV-cache slot each).
      max_model_len: tokens per request, prompt included (default: the model's context).
      kv_cache_memory: bytes the KV cache may take (None: no limit); too small a budget is an error naming the fix.
      sample_pool_memory: bytes of one step's head samples (its rows x the largest num_samples among them x
        llm_engine.sample_row_bytes); add_request refuses a request with which a step could exceed it.
    Requests:
      prompt_padding: "right" (the official rule: a partial last prompt chunk is padded on the right) or "left".
      seed: seeds the seeds of requests that bring none.
      noise: the noise source (noise.NoiseFn; default noise.philox_noise): tests feed recorded noise through it.
    Backends (step/policy.py chooses one per step among those built):
      use_kernels: the Triton kernels in the PyTorch step (None: on CUDA where triton is installed).
      use_cuda_graph: decode through CUDA graphs (None: on CUDA). On CPU it replays eagerly through the same buffers.
      cuda_graph_buckets: the graph batch sizes (None: graph_step.default_buckets).
      use_cpu_step: build the C++ step (csrc/) where it can run: a float32 CALM model on CPU with the extension built.
      cpu_isa: its instruction-set level, one of native_step.ISA_LEVELS ("generic", "avx2", "avx512", "avx512_bf16",
        "amx"); None takes $CALM_CPU_ISA, else the highest this CPU runs. From "avx2" up it keeps packed copies of
        the weights (their size again). A level the CPU cannot run is a ValueError naming the levels it can.
      screen_vocab: its bfloat16 vocabulary screen (None: where the level's default says so).
      step_backend: "auto" (the policy), or force one: "torch" (every step in PyTorch), "native" (the C++ step for
        every step, whatever the batch), "graph" (CUDA graphs for every decode step that fits a bucket).
      cpu_step_max_batch, cpu_prefill_max_chunks, cpu_pool_max_draws: the policy's limits for the C++ step under
        "auto" (measured).
    More than one process (calm_engine/distributed/):
      tensor_parallel_size: ranks that each hold a shard of the backbone and of the vocabulary projection; N > 1
        starts N - 1 worker processes (or, under torchrun, joins its group). Only the PyTorch step runs sharded: the
        C++ step and CUDA graphs are single-process (step_backend "native" / "graph" and use_cuda_graph=True are
        refused with N > 1). The noise source must then be picklable (the workers draw the same noise).
      parallel_timeout_s: how long rank 0 waits for a worker in a collective before the call raises (start-up: at
        least distributed/workers.py's WORKER_START_TIMEOUT_S).
    """

    max_batch_size: int = 64
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    sample_pool_memory: int = SAMPLE_POOL_MEMORY
    prompt_padding: str = "right"
    seed: int | None = None
    noise: NoiseFn | None = None
    use_kernels: bool | None = None
    use_cuda_graph: bool | None = None
    cuda_graph_buckets: tuple[int, ...] | None = None
    use_cpu_step: bool = True
    cpu_isa: str | None = None
    screen_vocab: bool | None = None
    step_backend: str = "auto"
    cpu_step_max_batch: int = CPU_STEP_MAX_BATCH
    cpu_prefill_max_chunks: int = CPU_PREFILL_MAX_CHUNKS
    cpu_pool_max_draws: int = CPU_POOL_MAX_DRAWS
    tensor_parallel_size: int = 1
    parallel_timeout_s: float = 60.0

    def __post_init__(self):
        _positive("max_batch_size", self.max_batch_size)
        if self.max_model_len is not None and not _is_int(self.max_model_len, 1):
            raise ValueError(f"max_model_len must be a positive number of tokens, got {self.max_model_len!r}")
        if self.kv_cache_memory is not None and not _is_int(self.kv_cache_memory, 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if not _is_int(self.sample_pool_memory, 1):
            raise ValueError(f"sample_pool_memory must be a positive number of bytes, got {self.sample_pool_memory!r}")
        if self.prompt_padding not in PROMPT_PADDING:
            raise ValueError(f"prompt_padding must be one of {list(PROMPT_PADDING)}, got {self.prompt_padding!r}")
        if self.seed is not None and not _is_int(self.seed, 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.noise is not None and not callable(self.noise):
            raise ValueError(f"noise must be a function (seeds, counters, samples, dim) -> noise, got {self.noise!r}")
        for name in ("use_kernels", "use_cuda_graph", "screen_vocab"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}")
        if not isinstance(self.use_cpu_step, bool):
            raise ValueError(f"use_cpu_step must be True or False, got {self.use_cpu_step!r}")
        if self.cuda_graph_buckets is not None:
            buckets = self.cuda_graph_buckets
            if isinstance(buckets, (str, bytes)) or not all(_is_int(b, 1) for b in _iterable(buckets)) or not buckets:
                raise ValueError(f"cuda_graph_buckets must be positive batch sizes, got {buckets}")
            object.__setattr__(self, "cuda_graph_buckets", tuple(sorted(set(buckets))))
        if self.cpu_isa is not None and not isinstance(self.cpu_isa, str):
            raise ValueError(f"cpu_isa must be the name of an instruction-set level or None, got {self.cpu_isa!r}")
        if self.step_backend not in STEP_BACKENDS:
            raise ValueError(f"step_backend must be one of {list(STEP_BACKENDS)}, got {self.step_backend!r}")
        if self.step_backend == "native" and not self.use_cpu_step:
            raise ValueError("step_backend='native' forces the C++ step, which use_cpu_step=False turns off")
        if self.step_backend == "graph" and self.use_cuda_graph is False:
            raise ValueError("step_backend='graph' forces CUDA graphs, which use_cuda_graph=False turns off")
        _positive("cpu_step_max_batch", self.cpu_step_max_batch, minimum=0)
        _positive("cpu_prefill_max_chunks", self.cpu_prefill_max_chunks, minimum=0)
        _positive("cpu_pool_max_draws", self.cpu_pool_max_draws, minimum=0)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        timeout = self.parallel_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
            raise ValueError(f"parallel_timeout_s must be a positive number of seconds, got {timeout!r}")
        if self.tensor_parallel_size > 1:
            if self.step_backend in ("native", "graph"):
                raise ValueError(
                    f"step_backend={self.step_backend!r} runs in one process only; with tensor_parallel_size="
                    f"{self.tensor_parallel_size} every step runs the PyTorch step (use 'auto' or 'torch')"
                )
            if self.use_cuda_graph:
                raise ValueError(
                    "use_cuda_graph=True: CUDA graphs run in one process only, not with tensor_parallel_size > 1"
                )

    def describe(self) -> str:
        """The options that differ from their defaults, one line."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return "EngineConfig(" + ", ".join(changed) + ")"


def _is_int(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def _iterable(value):
    try:
        return list(value)
    except TypeError:
        return [None]


def _positive(name: str, value, minimum: int = 1) -> None:
    if not _is_int(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

"""Which backends an engine has (build_backends) and which one runs a step (choose_backend): the one place either is
decided. The engine calls choose_backend for every prefill and decode; benchmarks call it to report the path a step
takes, and force one with EngineConfig.step_backend.

The rule under step_backend="auto":
- the C++ step (native) on a CPU, up to cpu_step_max_batch rows and, for a prefill, up to cpu_prefill_max_chunks
  prompt chunks in all (above those the PyTorch path's threaded products win; measured, see config.py), unless CUDA
  graphs are on; at T < 1 too (its pools decoded through the screened argmax), up to cpu_pool_max_draws head samples
  per step (the rows times the largest num_samples among them);
- else a decode step through a CUDA graph when graphs are on and a bucket holds the batch;
- else the PyTorch step (with the Triton kernels where use_kernels resolved to True).
With tensor_parallel_size > 1 the PyTorch step, sharded (distributed/), is the only backend built: the C++ step and
CUDA graphs run in one process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from calm_engine.engine.config import EngineConfig
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import philox_noise
from calm_engine.engine.step import native_step
from calm_engine.engine.step.backbone import rotary_table
from calm_engine.engine.step.graph_step import CudaGraphCapture, EagerCapture, GraphStep, default_buckets
from calm_engine.engine.step.interface import Phase, StepBackend, StepRow
from calm_engine.engine.step.native_step import NativeStep
from calm_engine.engine.step.ops import ops_for
from calm_engine.engine.step.token_step import TokenStep
from calm_engine.engine.step.torch_step import TorchStep
from calm_engine.engine.weights import ModelWeights
from calm_engine.kernels import triton_available


@dataclass(frozen=True)
class Backends:
    """The backends an engine built: the PyTorch step always, the graph and C++ steps where they apply."""

    torch: TorchStep
    graph: GraphStep | None
    native: NativeStep | None

    def describe(self) -> str:
        """The resolved capabilities, one line: the backends, their options, the graph buckets."""
        parts = [f"torch ({self.torch.ops.name} ops)"]
        if self.native is not None:
            parts.append(
                f"native (C++ step at ISA level {self.native.isa}, vocabulary screen {self.native.screen_vocab})"
            )
        if self.graph is not None:
            parts.append(f"graph (CUDA graphs{'' if self.graph.capture_is_cuda else ', replayed eagerly'}, buckets "
                         f"{self.graph.buckets})")  # fmt: skip
        return "backends: " + ", ".join(parts)

    def close(self) -> None:
        """Stop what the backends started (a tensor-parallel step's worker processes); idempotent."""
        close = getattr(self.torch, "close", None)
        if close is not None:
            close()


def build_backends(weights: ModelWeights, cache: SlotKVCache, config: EngineConfig) -> Backends:
    """The backends of an engine. With tensor_parallel_size > 1 only the PyTorch step, sharded over the ranks
    (distributed/workers.py), which checks the sizes before any process starts."""
    device = weights.device
    if config.tensor_parallel_size > 1:
        from calm_engine.distributed.workers import build_parallel_step  # torch.distributed only where it is used

        return Backends(build_parallel_step(weights, cache, config), None, None)
    noise = config.noise or philox_noise
    use_kernels = config.use_kernels
    if use_kernels is None:
        use_kernels = device.type == "cuda" and triton_available()
    rope = rotary_table(weights.shapes, cache.capacity, device, weights.dtype)
    step_class = TorchStep if weights.is_calm else TokenStep
    eager = step_class(weights, cache, ops_for(use_kernels), noise, rope)
    graph = None
    use_cuda_graph = config.use_cuda_graph
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda" or config.step_backend == "graph"
    if use_cuda_graph:  # on CPU the graphs replay eagerly through the same buffers (tests of the graph step)
        capture = CudaGraphCapture() if device.type == "cuda" else EagerCapture()
        graph = GraphStep(eager, list(config.cuda_graph_buckets or default_buckets(config.max_batch_size)), capture)
    if config.cpu_isa is not None:
        native_step.resolve_isa(config.cpu_isa, "cpu_isa")  # a bad level is an error even where the step cannot run
    native = None
    if config.use_cpu_step and native_step.available(weights):
        native = NativeStep(weights, cache, rope, noise, screen_vocab=config.screen_vocab, isa=config.cpu_isa)
    elif config.step_backend == "native":
        raise ValueError(
            "step_backend='native': the C++ step needs a float32 CALM model on CPU, the built extension (csrc/) and "
            "torch's sgemm"
        )
    return Backends(eager, graph, native)


def choose_backend(phase: Phase, rows: Sequence[StepRow], backends: Backends, config: EngineConfig) -> StepBackend:
    """The backend that runs this step of these rows (see the module's docstring for the rule)."""
    forced = config.step_backend
    if forced == "torch":
        return backends.torch
    native = backends.native
    if native is not None and native.supports(phase, rows):
        if forced == "native":
            return native
        draws = len(rows) * max(r.params.samples_per_step for r in rows)
        if forced == "auto" and backends.graph is None and len(rows) <= config.cpu_step_max_batch:
            if draws <= config.cpu_pool_max_draws and (
                phase is Phase.DECODE or sum(r.prompt_chunks for r in rows) <= config.cpu_prefill_max_chunks
            ):
                return native
    if phase is Phase.DECODE and backends.graph is not None and backends.graph.supports(phase, rows):
        return backends.graph
    return backends.torch


def device_summary(weights: ModelWeights) -> str:
    shapes = weights.shapes
    model = f"CALM (K={shapes.chunk_size})" if weights.is_calm else "token-level Llama"
    dtype = str(weights.dtype).removeprefix("torch.")
    threads = f", {torch.get_num_threads()} threads" if weights.device.type == "cpu" else ""
    return f"{model}, {dtype} on {weights.device}{threads}"

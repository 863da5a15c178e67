"""GraphStep: decode steps replayed from CUDA graphs of the PyTorch step (backbone + head + autoencoder decode +
sampling), one graph per bucket.

A graph is captured per (batch-size bucket, pool size, exact-sampler pools) the first time a step needs it, after
two warm-up runs, into one memory pool shared by all graphs. Replay copies the step's inputs into the first rows of
static buffers sized for the largest bucket and neutralises the padding rows: slot PADDING_SLOT (kv_cache.py), a
zero chunk at position 0, one sample at T = 1, so they touch no live request.

The capture mechanism is a small strategy object: `CudaGraphCapture` on CUDA, `EagerCapture` (calls the step on the
same static buffers) elsewhere, so the buffer logic is tested on CPU through the same interface.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from calm_engine.engine.kv_cache import PADDING_SLOT
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step.interface import Phase, StepBackend, StepResult, StepRow
from calm_engine.engine.step.torch_step import TorchStep

MAX_GRAPH_BATCH = 64  # the largest bucket by default; bigger batches run eagerly


def default_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to the engine's batch size (capped at MAX_GRAPH_BATCH)."""
    top = min(max_batch_size, MAX_GRAPH_BATCH)
    return sorted({b for b in (1, 2, 4, *range(8, top + 1, 8)) if b <= top} | {top})


class EagerCapture:
    """'Captures' by remembering the function; replay calls it on the static buffers (CPU, tests)."""

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        return step


class CudaGraphCapture:
    def __init__(self):
        self.pool = None

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisations and allocator growth happen outside the graph
                step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        except RuntimeError as error:
            raise RuntimeError(
                f"CUDA graph capture of the decode step failed ({error}); run with use_cuda_graph=False, or lower "
                "max_batch_size / pass cuda_graph_buckets with smaller sizes"
            ) from error
        self.pool = graph.pool()
        return graph.replay


@dataclass
class _Buffers:
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    samples: torch.Tensor  # samples each row uses (1 for T = 1)
    inv_floor: torch.Tensor
    inv_frac: torch.Tensor
    pools: torch.Tensor


class GraphStep(StepBackend):
    """Decodes through the graph of the smallest bucket that holds the batch; prefills eagerly (the wrapped step)."""

    name = "graph"

    def __init__(self, eager: TorchStep, buckets: list[int], capture=None):
        self.eager = eager
        self.buckets = sorted(set(buckets))
        self.capture = capture if capture is not None else EagerCapture()
        self.capture_is_cuda = isinstance(self.capture, CudaGraphCapture)
        self.graphs: dict[tuple[int, int, int], tuple[Callable[[], None], StepResult]] = {}
        rows, device = self.buckets[-1], eager.device

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.buffers = _Buffers(
            zeros(rows, eager.chunk_size), zeros(rows), zeros(rows), zeros(rows), zeros(rows), zeros(rows),
            zeros(rows), zeros(rows, dtype=torch.float64), zeros(rows),
        )  # fmt: skip

    def supports(self, phase: Phase, rows: Sequence[StepRow]) -> bool:
        return len(rows) <= self.buckets[-1]

    def prefill(self, rows: Sequence[StepRow]) -> StepResult:
        return self.eager.prefill(rows)

    def decode(self, rows: Sequence[StepRow]) -> StepResult:
        ids, positions, slots = self.eager.decode_inputs(rows)
        return self.run(ids, positions, slots, self.eager.sampling_batch(rows))

    def bucket(self, batch_size: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, batch_size)]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, batch: SamplingBatch) -> StepResult:
        """The decode step of `len(ids)` rows through the graph of its bucket."""
        size = ids.shape[0]
        bucket = self.bucket(size)
        b = self.buffers
        b.ids[:size].copy_(ids)
        b.positions[:size].copy_(positions)
        b.slots[:size].copy_(slots)
        b.seeds[:size].copy_(batch.seeds)
        b.steps[:size].copy_(batch.steps)
        b.samples[:size].copy_(batch.valid.sum(-1))
        b.inv_floor[:size].copy_(batch.inv_floor)
        b.inv_frac[:size].copy_(batch.inv_frac)
        b.pools[:size].copy_(batch.pools)
        self._neutralise(size, bucket)
        key = (bucket, batch.valid.shape[1], batch.max_pools)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        replay, out = self.graphs[key]
        replay()
        return StepResult(out.chunks[:size], out.fell_back[:size])

    def _neutralise(self, size: int, bucket: int) -> None:
        b = self.buffers
        for tensor in (b.ids, b.positions, b.seeds, b.steps, b.inv_frac, b.pools):
            tensor[size:bucket].zero_()
        b.slots[size:bucket].fill_(PADDING_SLOT)
        b.samples[size:bucket].fill_(1)
        b.inv_floor[size:bucket].fill_(1)

    def _capture(self, bucket: int, samples: int, max_pools: int) -> tuple[Callable[[], None], StepResult]:
        step, b = self.eager, self.buffers
        columns = torch.arange(samples, device=b.ids.device)
        outputs: list[StepResult] = []

        def run() -> None:
            hidden = step.decode_hidden(b.ids[:bucket], b.positions[:bucket], b.slots[:bucket], step.cache.capacity)
            sampling = SamplingBatch(
                seeds=b.seeds[:bucket],
                steps=b.steps[:bucket],
                valid=columns[None] < b.samples[:bucket, None],
                inv_floor=b.inv_floor[:bucket],
                inv_frac=b.inv_frac[:bucket],
                pools=b.pools[:bucket],
                max_pools=max_pools,
            )
            result = step.sample(hidden, sampling, allow_sync=False)
            if outputs:
                outputs[0].chunks.copy_(result.chunks)
                outputs[0].fell_back.copy_(result.fell_back)
            else:
                outputs.append(result)

        run()  # the first run allocates the outputs that the graph then writes into
        replay = self.capture.capture(run)
        return replay, outputs[0]

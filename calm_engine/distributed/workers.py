"""The processes of a tensor-parallel engine: rank 0 (the caller, which owns the scheduler) and N - 1 workers.

Rank 0 starts the workers itself (torch.multiprocessing spawn, a loopback TCP rendezvous; gloo on CPU, NCCL on GPU,
one GPU per rank), or under torchrun joins the group torchrun made, where ranks > 0 serve rank 0 from inside
LLM(...) and exit when it closes. Each step, rank 0 broadcasts the step's rows (slots, seeds, counters, prompt or
last chunk, sampling parameters) and every rank runs the same TorchStep on its shard (ParallelStep).

Faults: before each step rank 0 checks that its workers live, and a collective that fails or waits longer than
parallel_timeout_s raises TensorParallelError naming the workers that died; the engine is then unusable (close it).
Workers poll their parent and exit when it is gone, so no worker outlives the caller.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calm_engine.distributed.group import environment_world_size
from calm_engine.distributed.tensor_parallel import ParallelOps, check_sizes, shard_weights
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import philox_noise
from calm_engine.engine.step.backbone import rotary_table
from calm_engine.engine.step.interface import StepResult, StepRow
from calm_engine.engine.step.ops import ops_for
from calm_engine.engine.step.torch_step import TorchStep
from calm_engine.engine.weights import ModelWeights
from calm_engine.kernels import triton_available
from calm_engine.sampling_params import SamplingParams

PARENT_POLL_S = 0.5
MESSAGE_BYTES = 16384  # one broadcast holds the rows of a decode step of ~100 requests


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or stopped answering."""


@dataclass(frozen=True)
class RowMessage:
    """The fields of a StepRow, as rank 0 sends them to the workers."""

    slot: int
    seed: int
    chunks_done: int
    fed_prompt: list[int]
    last_chunk: list[int]
    params: SamplingParams
    prompt_chunks: int
    next_position: int


def row_messages(rows: Sequence[StepRow], prefill: bool) -> list[RowMessage]:
    return [
        RowMessage(r.slot, r.seed, r.chunks_done, r.fed_prompt if prefill else [], [] if prefill else r.last_chunk,
                   r.params, r.prompt_chunks, r.next_position)
        for r in rows
    ]  # fmt: skip


class WorkerGroup:
    """Rank 0's handle on its workers: sends each step, turns a worker's death or silence into TensorParallelError."""

    def __init__(self, size: int, processes: list, owns_group: bool, device: torch.device):
        self.size, self.processes, self.owns_group, self.device = size, processes, owns_group, device
        self.state = {"failed": None}  # shared with the finalizer: a failed group gets no stop message
        self._finalizer = weakref.finalize(self, _shutdown, processes, owns_group, device, self.state)

    @property
    def failed(self) -> str | None:
        """Why the group failed (a step raised TensorParallelError), or None."""
        return self.state["failed"]

    @failed.setter
    def failed(self, reason: str) -> None:
        self.state["failed"] = reason

    def send(self, message) -> None:
        self.check()
        with self.guard():
            broadcast_message(message, self.device)

    def check(self) -> None:
        if self.failed is not None:
            raise TensorParallelError(f"the tensor-parallel group failed earlier ({self.failed}); close the engine")
        dead = [
            f"worker {rank} (exit code {p.exitcode})" for rank, p in enumerate(self.processes, 1) if not p.is_alive()
        ]
        if dead:
            self.failed = ", ".join(dead) + " exited"
            raise TensorParallelError(f"tensor-parallel {self.failed}; the engine cannot run steps: close it")

    def guard(self):
        return _Guard(self)

    def close(self) -> None:
        self._finalizer()


class _Guard:
    def __init__(self, group: WorkerGroup):
        self.group = group

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if (
            error is None
            or not isinstance(error, (RuntimeError, dist.DistError))
            or isinstance(error, TensorParallelError)
        ):
            return False
        time.sleep(0.2)  # let a dying worker's exit code land before naming it
        dead = [
            f"worker {r} (exit code {p.exitcode})" for r, p in enumerate(self.group.processes, 1) if not p.is_alive()
        ]
        self.group.failed = (", ".join(dead) + " exited") if dead else f"a collective failed: {error}"
        raise TensorParallelError(
            f"tensor-parallel step failed: {self.group.failed}; the engine cannot run steps: close it"
        ) from error


def _dead(processes: list) -> list[str]:
    return [f"worker {rank} (exit code {p.exitcode})" for rank, p in enumerate(processes, 1) if not p.is_alive()]


def broadcast_message(message, device: torch.device):
    """Rank 0's message (any picklable object; None on the other ranks) -> the message on every rank.

    One broadcast of a fixed MESSAGE_BYTES buffer (length, then the pickle) carries a step's rows; a longer pickle
    takes a second broadcast of the rest. broadcast_object_list took 1.2 ms per call on 2 CPU cores (gloo, loopback)
    against 0.14 ms for an all-reduce, a third of a small model's step."""
    buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=device)
    data = b""
    if dist.get_rank() == 0:
        data = pickle.dumps(message)
        head = len(data).to_bytes(8, "little") + data[: MESSAGE_BYTES - 8]
        buffer[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    length = int.from_bytes(bytes(buffer[:8].tolist()), "little")
    if length > MESSAGE_BYTES - 8:
        rest = torch.zeros(length - (MESSAGE_BYTES - 8), dtype=torch.uint8, device=device)
        if dist.get_rank() == 0:
            rest[:] = torch.frombuffer(bytearray(data[MESSAGE_BYTES - 8 :]), dtype=torch.uint8)
        dist.broadcast(rest, src=0)
        payload = bytes(buffer[8:].cpu().numpy()) + bytes(rest.cpu().numpy())
    else:
        payload = bytes(buffer[8 : 8 + length].cpu().numpy())
    return message if dist.get_rank() == 0 else pickle.loads(payload)


def _shutdown(processes: list, owns_group: bool, device: torch.device, state: dict | None = None) -> None:
    """Tell the workers to stop (unless the group failed), drop the group rank 0 made, reap the spawned processes."""
    if dist.is_initialized():
        if (state is None or state["failed"] is None) and all(p.is_alive() for p in processes):
            try:
                broadcast_message(None, device)  # the workers' signal to stop
            except (RuntimeError, dist.DistError):
                pass
        if owns_group:
            dist.destroy_process_group()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class ParallelStep(TorchStep):
    """The PyTorch step on one rank's shard; on rank 0 (group set) each prefill and decode is first sent to the
    workers, which run the same step (serve())."""

    def __init__(self, weights, cache, ops, noise, rope, group: WorkerGroup | None):
        super().__init__(weights, cache, ops, noise, rope)
        self.group = group
        self.name = f"torch (tensor parallel x{ops.size})"

    def prefill(self, rows: Sequence[StepRow]) -> StepResult:
        return self._run("prefill", rows)

    def decode(self, rows: Sequence[StepRow]) -> StepResult:
        return self._run("decode", rows)

    def _run(self, phase: str, rows: Sequence[StepRow]) -> StepResult:
        run = getattr(TorchStep, phase)
        if self.group is None:
            return run(self, rows)
        self.group.send((phase, row_messages(rows, phase == "prefill")))
        with self.group.guard():
            return run(self, rows)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    def serve(self) -> None:
        """A worker's loop: run every step rank 0 sends until it sends None."""
        while True:
            message = broadcast_message(None, self.device)
            if message is None:
                return
            phase, rows = message
            getattr(TorchStep, phase)(self, rows)


def build_parallel_step(weights: ModelWeights, cache: SlotKVCache, config) -> ParallelStep:
    """Rank 0's step on `cache` (kv_heads / N heads): checks the sizes, starts (or joins) the group, and builds its
    shard. Ranks > 0 of a torchrun group serve from here and exit when rank 0 closes."""
    size, device = config.tensor_parallel_size, weights.device
    check_sizes(weights, size, device)
    if environment_world_size() > 1:  # under torchrun
        if environment_world_size() != size:
            raise ValueError(
                f"under torchrun tensor_parallel_size ({size}) must equal WORLD_SIZE ({environment_world_size()})"
            )
        if not dist.is_initialized():
            dist.init_process_group(_backend(device), timeout=timedelta(seconds=config.parallel_timeout_s))
        rank = dist.get_rank()
        step = _rank_step(shard_weights(weights, rank, size), cache, config, rank, size, None)
        if rank > 0:
            step.serve()
            sys.exit(0)
        step.group = WorkerGroup(size, [], owns_group=False, device=device)
        return step
    if dist.is_initialized():
        raise ValueError("tensor_parallel_size > 1 starts its own process group, and this process already has one")
    timeout = timedelta(seconds=config.parallel_timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
    context = mp.get_context("spawn")
    processes = []
    try:
        for rank in range(1, size):
            # A worker's shard travels in shared host memory (a GPU worker copies it to its own device).
            shard = _to_device(shard_weights(weights, rank, size), torch.device("cpu"))
            process = context.Process(
                target=_worker_main,
                args=(rank, size, store.port, shard, cache.config, cache.capacity, config, os.getpid()),
                daemon=True,
            )
            process.start()
            processes.append(process)
        _wait_for_workers(store, processes, max(config.parallel_timeout_s, WORKER_START_TIMEOUT_S))
        for process in processes:
            process._args = ()  # a ready worker holds its shard: rank 0 drops its reference to the host copy
        dist.init_process_group(_backend(device), store=store, rank=0, world_size=size, timeout=timeout)
    except BaseException:
        _shutdown(processes, owns_group=False, device=device)
        raise
    group = WorkerGroup(size, processes, owns_group=True, device=device)
    return _rank_step(shard_weights(weights, 0, size), cache, config, 0, size, group)


# Start-up has its own bound: a spawned worker imports torch and this package first, which takes tens of seconds on
# a busy 2-core machine (a 3 s parallel_timeout_s failed there at start-up); a worker that dies meanwhile is named at
# once.
WORKER_START_TIMEOUT_S = 120.0


def _wait_for_workers(store, processes: list, timeout_s: float) -> None:
    """Until every worker has said it is ready in the store; a worker that exits first is named at once."""
    keys = [f"ready{rank}" for rank in range(1, len(processes) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        for rank, process in enumerate(processes, 1):
            if not process.is_alive():
                raise TensorParallelError(
                    f"tensor-parallel worker {rank} exited during start-up (exit code {process.exitcode}); its "
                    "traceback is above. A script that builds LLM(..., tensor_parallel_size=N) must run it under "
                    "`if __name__ == '__main__':`, since the workers are spawned and import the main module"
                )
        if time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _rank_step(shard: ModelWeights, cache: SlotKVCache, config, rank: int, size: int, group) -> ParallelStep:
    capacity = cache.capacity
    use_kernels = config.use_kernels
    if use_kernels is None:
        use_kernels = shard.device.type == "cuda" and triton_available()
    ops = ParallelOps(ops_for(use_kernels), rank, size, shard.shapes.vocab)
    rope = rotary_table(shard.shapes, capacity, shard.device, shard.dtype)
    return ParallelStep(shard, cache, ops, config.noise or philox_noise, rope, group)


def _worker_main(rank, size, port, shard, model_config, capacity, config, parent_pid) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    if shard.device.type == "cuda":
        torch.cuda.set_device(rank)
        shard = _to_device(shard, torch.device("cuda", rank))
    timeout = timedelta(seconds=config.parallel_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
    store.set(f"ready{rank}", "1")
    dist.init_process_group(_backend(shard.device), store=store, rank=rank, world_size=size, timeout=timeout)
    cache = SlotKVCache(model_config, config.max_batch_size, capacity, shard.device, shard.dtype, None, size)
    with torch.inference_mode():
        _rank_step(shard, cache, config, rank, size, None).serve()
    dist.destroy_process_group()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _to_device(weights: ModelWeights, device: torch.device) -> ModelWeights:
    """Every tensor of the description moved to `device` (the same tensors where they are there already)."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(
                value, **{f.name: move(getattr(value, f.name)) for f in dataclasses.fields(value)}
            )
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return move(weights)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"

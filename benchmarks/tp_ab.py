"""Tensor parallelism: TP = 2 against TP = 1 step time on this CPU, the bytes a decode step all-reduces at CALM-M and
CALM-XL shapes, and a paper estimate of the TP speed-up on NVLink-connected H200s.

    python benchmarks/tp_ab.py --measure --shape small --batch 1 8 32     # A/B on the CPU (2 cores), then the tables
    python benchmarks/tp_ab.py                                             # the computed tables only

The A/B alternates blocks of decode steps of two engines in one process on the same seeded requests: the PyTorch step
in one process with 2 threads, and TP = 2 (rank 0 here and one worker, 1 thread each, gloo over loopback). Both must
sample the same ids. The tables count bytes from the real shards (distributed/tensor_parallel.shard_weights on meta
tensors); the H200 estimate is a roofline model whose constants are printed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes import CALM_M, cached_checkpoint  # noqa: E402
from calm_engine import LLM, SamplingParams  # noqa: E402
from calm_engine.distributed.tensor_parallel import shard_weights  # noqa: E402
from calm_engine.engine.weights import ModelWeights  # noqa: E402
from calm_engine.model.calm import CalmModel  # noqa: E402
from calm_engine.model.config import AutoencoderConfig, CalmConfig  # noqa: E402

# CALM-XL: 1.82 B parameters (paper); its shape is not published with the code. 16 layers of width 2560 (one public
# summary, unverified) with CALM-M's ratios (intermediate 2.69 x hidden, head_dim 64, 4 head blocks) gives ~1.8 B.
CALM_XL = {
    "shared": CALM_M["shared"],
    "calm": {**CALM_M["calm"], "hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 40,
             "num_key_value_heads": 40},
    "autoencoder": CALM_M["autoencoder"],
}  # fmt: skip
SHAPES = {"CALM-M": CALM_M, "CALM-XL (assumed shape)": CALM_XL}

# H200 SXM constants of the estimate: HBM3e 4.8 TB/s, of which a decode GEMV reaches ~80%; NVLink 4 all-reduce of
# a small message: ~8 us of latency per call (NCCL's small-message ring/LL protocol on one NVSwitch node), bus
# bandwidth ~360 GB/s for larger ones. Kernel launches are left out (see the notes printed with the table).
HBM_BYTES_PER_S = 4.8e12 * 0.8
ALLREDUCE_LATENCY_S = 8e-6
BUS_BYTES_PER_S = 360e9
BF16 = 2


def meta_weights(fields: dict) -> ModelWeights:
    calm = CalmConfig(**fields["shared"], **fields["calm"])
    autoencoder = AutoencoderConfig(**fields["shared"], **fields["autoencoder"])
    with torch.device("meta"):
        return ModelWeights.of(CalmModel(calm, autoencoder))


def tensors(value):
    """Every tensor of a weights description, once (by identity)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from tensors(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from tensors(item)


def weight_bytes(weights: ModelWeights, full: ModelWeights) -> tuple[int, int]:
    """(bytes in bf16 a rank reads per decode step from its shards, from replicated tensors). The embedding is left
    out: a step reads K rows of it."""
    full_ids = {id(t) for t in tensors(full)}
    embed = id(full.backbone.embed)
    sharded = replicated = 0
    seen = set()
    for t in tensors(weights):
        if id(t) in seen or id(t) == embed:
            continue
        seen.add(id(t))
        if id(t) in full_ids:
            replicated += t.numel() * BF16
        else:
            sharded += t.numel() * BF16
    return sharded, replicated


def communication(weights: ModelWeights, batch: int, samples: int, ranks: int) -> tuple[int, int, int]:
    """(all-reduce payload bytes, collective calls, all-gather bytes received) per decode step and rank (bf16)."""
    shapes = weights.shapes
    layers = len(weights.backbone.layers)
    all_reduce = 2 * layers * batch * shapes.hidden * BF16  # after o and after down, [B, hidden] each
    gather = (ranks - 1) * batch * samples * shapes.chunk_size * (BF16 + 8)  # (max, int64 index) of the other ranks
    return all_reduce, 2 * layers + 2, gather


def estimate(full: ModelWeights, ranks: int, batch: int, context: int) -> float:
    """Seconds per decode step on `ranks` H200s: bytes read over HBM bandwidth (shards / ranks + replicated), the KV
    cache read (sharded), and the collectives (latency per call + payload over bus bandwidth)."""
    shard = shard_weights(full, 0, ranks) if ranks > 1 else full
    sharded, replicated = weight_bytes(shard, full) if ranks > 1 else (sum(weight_bytes(full, full)), 0)
    shapes = full.shapes
    kv = 2 * len(full.backbone.layers) * batch * context * shapes.kv_heads * shapes.head_dim * BF16 / ranks
    memory = (sharded + replicated + kv) / HBM_BYTES_PER_S
    if ranks == 1:
        return memory
    payload, calls, gather = communication(full, batch, 1, ranks)
    ring = 2 * (ranks - 1) / ranks
    return memory + calls * ALLREDUCE_LATENCY_S + (payload * ring + gather) / BUS_BYTES_PER_S


def print_tables() -> None:
    print("\n## Bytes per decode step (bf16)\n")
    print("| shape | params | weights read per rank, TP=1 / TP=2 / TP=8 | all-reduce payload per row | collectives |")
    print("|---|---|---|---|---|")
    for name, fields in SHAPES.items():
        full = meta_weights(fields)
        params = sum(t.numel() for t in {id(t): t for t in tensors(full)}.values())
        per_rank = [sum(weight_bytes(full, full)) / 2**20]
        per_rank += [sum(weight_bytes(shard_weights(full, 0, ranks), full)) / 2**20 for ranks in (2, 8)]
        payload, calls, _ = communication(full, 1, 1, 2)
        read = " / ".join(f"{b:,.0f}" for b in per_rank)
        what = f"{calls} per step (2 per layer + the argmax's 2 all-gathers)"
        print(f"| {name} | {params / 1e6:,.0f} M | {read} MiB | {payload / 1024:,.0f} KiB (x B rows) | {what} |")
    print("\n## Paper estimate: decode step on NVLink H200s (context 1024 chunks), speed-up over one GPU\n")
    print("| shape | batch | TP=1 step | TP=2 | TP=4 | TP=8 |")
    print("|---|---|---|---|---|---|")
    for name, fields in SHAPES.items():
        full = meta_weights(fields)
        for batch in (1, 64):
            one = estimate(full, 1, batch, 1024)
            cells = [f"{one / estimate(full, ranks, batch, 1024):.2f}x" for ranks in (2, 4, 8)]
            print(f"| {name} | {batch} | {one * 1e6:,.0f} us | {' | '.join(cells)} |")


def start(llm: LLM, batch: int, max_tokens: int) -> None:
    for i in range(batch):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=100 + i)
        llm.engine.add_request(f"r{i}", list(range(3, 35)), params)
    llm.engine.step()  # the prefill


def timed(llm: LLM, threads: int, calls: int) -> float:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    for _ in range(calls):
        llm.engine.step()
    return (time.perf_counter() - started) / calls


def measure(shape: str, batches: list[int], rounds: int, calls: int) -> None:
    steps = rounds * calls + 2
    model_len = 32 + 4 * steps + 8
    path = str(cached_checkpoint(shape))
    one = LLM(path, step_backend="torch", max_batch_size=max(batches), max_model_len=model_len)
    two = LLM(path, tensor_parallel_size=2, max_batch_size=max(batches), max_model_len=model_len)
    print(f"## TP = 2 vs TP = 1 on this CPU: shape {shape}, float32, T = 1, prompt 32 tokens, {torch.__version__}\n")
    print("| batch | TP=1 (1 process, 2 threads) | TP=2 (2 processes, 1 thread each) | TP=2 / TP=1 |")
    print("|---|---|---|---|")
    for batch in batches:
        start(one, batch, 4 * steps)
        start(two, batch, 4 * steps)
        times = {"one": [], "two": []}
        for _ in range(rounds):
            times["one"].append(timed(one, 2, calls))
            times["two"].append(timed(two, 1, calls))
        same = all(one.engine.requests[f"r{i}"].output_ids == two.engine.requests[f"r{i}"].output_ids
                   for i in range(batch))  # fmt: skip
        for i in range(batch):
            one.engine.abort(f"r{i}")
            two.engine.abort(f"r{i}")
        a, b = statistics.median(times["one"]), statistics.median(times["two"])
        print(f"| {batch} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {b / a:.2f}{'' if same else ' (IDS DIFFER)'} |")
    two.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="run the CPU A/B before the tables")
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=10, help="alternations per batch size")
    parser.add_argument("--calls", type=int, default=10, help="decode steps per timed block")
    args = parser.parse_args()
    if args.measure:
        measure(args.shape, args.batch, args.rounds, args.calls)
    print_tables()


if __name__ == "__main__":
    main()

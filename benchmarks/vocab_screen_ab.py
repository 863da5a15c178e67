"""The C++ decode step with and without the bfloat16 vocabulary screen (csrc/vocab_screen.h), alternated in one
process on the same inputs: median step time of each and their ratio, per batch size; both must give the same ids.

    python benchmarks/vocab_screen_ab.py --shape small --batch 1 8 16
    python benchmarks/vocab_screen_ab.py --shape calm_m --batch 1 8 --rounds 5 --calls 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes import cached_checkpoint  # noqa: E402
from calm_engine import LLM  # noqa: E402
from calm_engine.engine.cpu_step import CpuDecodeStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=30, help="alternations per batch size")
    parser.add_argument("--calls", type=int, default=10, help="steps per timed block")
    parser.add_argument("--position", type=int, default=40, help="chunks already in the cache (attention length)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = LLM(str(cached_checkpoint(args.shape)), max_batch_size=max(args.batch), max_model_len=4 * (args.position + 8))
    runner, config = llm.engine.runner, llm.model.config
    steps = {"screened": CpuDecodeStep(runner, screen_vocab=True), "float32": CpuDecodeStep(runner, screen_vocab=False)}
    print(f"shape {args.shape}, 2 threads, {args.rounds} alternations of {args.calls} steps each")
    print("| batch | screened ms/step | float32 ms/step | float32 / screened | same ids |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        ids = torch.randint(3, config.vocab_size, (batch, config.patch_size), generator=generator)
        positions, slots = torch.full((batch,), args.position), torch.arange(batch)
        seeds, counters = torch.arange(batch) + 1, torch.zeros(batch, dtype=torch.long)
        outputs = {name: step.run(ids, positions, slots, seeds, counters) for name, step in steps.items()}
        same = torch.equal(outputs["screened"], outputs["float32"])
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    step.run(ids, positions, slots, seeds, counters)
                times[name].append((time.perf_counter() - start) / args.calls)
        screened, plain = (1e3 * statistics.median(times[name]) for name in ("screened", "float32"))
        print(f"| {batch} | {screened:.3f} | {plain:.3f} | {plain / screened:.2f}x | {same} |")


if __name__ == "__main__":
    main()

"""The C++ decode step with its AVX-512 kernels (packed products, packed vocabulary screen on AMX or AVX512-BF16,
vectorised SiLU / exp) against the same step on torch's sgemm and MKL's bfloat16 GEMM, alternated in one process on
the same inputs: median step time of each and their ratio, per batch size; both must give the same ids.

    python benchmarks/cpu_step_ab.py --shape small --batch 1 8 16
    python benchmarks/cpu_step_ab.py --shape calm_m --batch 1 8 --rounds 4 --calls 2
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
    parser.add_argument("--position", type=int, default=24, help="chunks already in the cache (attention length)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = LLM(str(cached_checkpoint(args.shape)), max_batch_size=max(args.batch), max_model_len=4 * (args.position + 8))
    runner, config = llm.engine.runner, llm.model.config
    steps = {"avx512": CpuDecodeStep(runner, avx512=True), "sgemm": CpuDecodeStep(runner, avx512=False)}
    print(f"shape {args.shape}, 2 threads, {args.rounds} alternations of {args.calls} steps each")
    print("| batch | AVX-512 kernels ms/step | sgemm + MKL ms/step | sgemm / AVX-512 | same ids |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        ids = torch.randint(3, config.vocab_size, (batch, config.patch_size), generator=generator)
        positions, slots = torch.full((batch,), args.position), torch.arange(batch)
        seeds, counters = torch.arange(batch) + 1, torch.zeros(batch, dtype=torch.long)
        outputs = {name: step.run(ids, positions, slots, seeds, counters) for name, step in steps.items()}
        same = torch.equal(outputs["avx512"], outputs["sgemm"])
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    step.run(ids, positions, slots, seeds, counters)
                times[name].append((time.perf_counter() - start) / args.calls)
        fast, plain = (1e3 * statistics.median(times[name]) for name in ("avx512", "sgemm"))
        print(f"| {batch} | {fast:.3f} | {plain:.3f} | {plain / fast:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()

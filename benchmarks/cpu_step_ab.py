"""Two configurations of the C++ decode step, alternated in one process on the same inputs: median step time of each
and their ratio, per batch size; both must give the same ids.

    python benchmarks/cpu_step_ab.py --compare isa --isa avx512_bf16 generic --shape small --batch 1 8 16
    python benchmarks/cpu_step_ab.py --compare isa --isa avx2 generic --shape calm_m --batch 1 8 --rounds 15 --calls 3
    python benchmarks/cpu_step_ab.py --compare screen --isa avx2 --position 40 --batch 1 8 16

--compare isa: the step at the first instruction-set level of --isa against the same step at the second (default:
the highest this CPU runs against generic, i.e. torch's sgemm and plain loops); each level with its default screen.
--compare screen: the bfloat16 vocabulary screen (csrc/vocab_screen.h) against the plain float32 projection, both at
the first level of --isa.
To time a level as it runs on a CPU without the higher ones, restrict torch's MKL too (MKL_ENABLE_INSTRUCTIONS=AVX2
for avx2 and generic, AVX512 for avx512): the sgemm and the bfloat16 GEMM the step calls are MKL's.
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
from calm_engine.engine.step.native_step import ISA_LEVELS, NativeStep, supported_isas  # noqa: E402


def sides(compare: str, levels: list[str]) -> list[tuple[str, dict]]:
    """(name, NativeStep options) of the two sides of a comparison, the one expected faster first."""
    first = levels[0]
    if compare == "screen":
        return [
            (f"{first} screened", dict(isa=first, screen_vocab=True)),
            (f"{first} float32", dict(isa=first, screen_vocab=False)),
        ]
    second = levels[1] if len(levels) > 1 else "generic"
    return [(first, dict(isa=first)), (second, dict(isa=second))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["isa", "screen"], default="isa")
    parser.add_argument("--isa", nargs="+", choices=ISA_LEVELS, default=[supported_isas()[-1], "generic"])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=30, help="alternations per batch size")
    parser.add_argument("--calls", type=int, default=10, help="steps per timed block")
    parser.add_argument("--position", type=int, default=24, help="chunks already in the cache (attention length)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = LLM(str(cached_checkpoint(args.shape)), max_batch_size=max(args.batch), max_model_len=4 * (args.position + 8))
    eager, config = llm.engine.backends.torch, llm.model.config
    (fast, fast_options), (plain, plain_options) = sides(args.compare, args.isa)
    steps = {
        name: NativeStep(eager.weights, eager.cache, eager.rope, eager.noise, **options)
        for name, options in ((fast, fast_options), (plain, plain_options))
    }
    screens = ", ".join(f"{name}: screen {step.screen_vocab}" for name, step in steps.items())
    print(f"shape {args.shape}, 2 threads, {args.rounds} alternations of {args.calls} steps each; {screens}")
    print(f"| batch | {fast} ms/step | {plain} ms/step | {plain} / {fast} | same ids |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        ids = torch.randint(3, config.vocab_size, (batch, config.patch_size), generator=generator)
        positions, slots = torch.full((batch,), args.position), torch.arange(batch)
        seeds, counters = torch.arange(batch) + 1, torch.zeros(batch, dtype=torch.long)
        outputs = {name: step.run(ids, positions, slots, seeds, counters) for name, step in steps.items()}
        same = torch.equal(outputs[fast], outputs[plain])
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    step.run(ids, positions, slots, seeds, counters)
                times[name].append((time.perf_counter() - start) / args.calls)
        a, b = (1e3 * statistics.median(times[name]) for name in (fast, plain))
        print(f"| {batch} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()

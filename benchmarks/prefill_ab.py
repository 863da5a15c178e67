"""The engine's first step (prefill + first chunk) with the C++ prefill against the PyTorch one, alternated in one run.

    python benchmarks/prefill_ab.py [--shape small] [--batch 1 8] [--prompt-len 32 512] [--repeats 7]

This measured the policy's limit EngineConfig.cpu_prefill_max_chunks (config.py, benchmarks/RESULTS.md): two engines
on the one loaded model, one forced to each path (EngineConfig.step_backend "native" and "torch"); decode steps are
not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e import random_prompts  # noqa: E402
from benchmarks.shapes import cached_checkpoint  # noqa: E402
from calm_engine import LLM, SamplingParams, load  # noqa: E402

PATHS = {"C++": "native", "PyTorch": "torch"}  # EngineConfig.step_backend forcing each path


def first_step_seconds(llm: LLM, prompts: list[list[int]], tag: str) -> float:
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=64))
    # The PyTorch path leaves torch's OpenMP thread spinning for milliseconds on the core the C++ step's second
    # thread needs: let it go idle first, so each path is timed on its own.
    time.sleep(0.05)
    start = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - start
    for i in range(len(prompts)):
        engine.abort(f"{tag}-{i}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(cached_checkpoint(args.shape))
    try:
        llms = {
            path: LLM(model, max_batch_size=max(args.batch), step_backend=backend) for path, backend in PATHS.items()
        }
    except ValueError as error:
        raise SystemExit(f"the C++ step is not available here: {error}") from None
    config = model.config
    avoid = {config.pad_token_id, *config.eos_token_ids} - {None}
    for batch in args.batch:
        for prompt_len in args.prompt_len:
            prompts = random_prompts(config.vocab_size, batch, prompt_len, 0, avoid)
            times = {path: [] for path in PATHS}
            for repeat in range(args.repeats):
                for path, llm in llms.items():
                    times[path].append(first_step_seconds(llm, prompts, f"{path}{repeat}"))
            cpp, eager = (statistics.median(times[path]) for path in PATHS)
            print(
                f"batch {batch} x prompt {prompt_len}: first step C++ {1e3 * cpp:.2f} ms, "
                f"PyTorch {1e3 * eager:.2f} ms, PyTorch / C++ {eager / cpp:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

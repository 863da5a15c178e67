"""End-to-end generation benchmark: this engine, the official `generate` and a token-level Llama, side by side.

    python benchmarks/e2e.py --shape small --batch 1 8 --temperature 1 --prompt-len 32 --new-tokens 64
    python benchmarks/e2e.py --shape calm_m --batch 1 8 --floor            # CALM-M: step time vs its matmul floor

The official side runs when $CALM_OFFICIAL_DIR and $CALM_OFFICIAL_PYTHON point at a checkout and an interpreter
with transformers==4.43.0 (benchmarks/official.py); it is skipped otherwise. The machine is shared and noisy, so
every configuration alternates engine and official runs (engine, official, engine) and reports their ratio; only
ratios from one run are meaningful on CPU.

The floor (--floor) is the same matrix products as one decode step of the engine (backbone, compression, head, the
autoencoder decoder and its vocabulary projection, at the step's row counts), timed alone with the model's weights:
with the dense float32 projection, and where the step screens the vocabulary in bfloat16 (csrc/vocab_screen.h) also
with the bfloat16 projection (the screen's own product). On the C++ step at T < 1, --floor also reports the step's
time split (head, decoder MLP, vocabulary argmax, counting and choice) and the screen's candidates per row. The
floor runs torch's own kernels (`F.linear`); the C++ step's packed products (csrc/packed_linear.h) can be faster than
that, so step / floor can fall below 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_engine.kernels import ae_decode  # noqa: E402

from benchmarks.official import official_unavailable_reason, run_official  # noqa: E402
from benchmarks.shapes import cached_checkpoint  # noqa: E402
from calm_engine import LLM, SamplingParams  # noqa: E402
from calm_engine.engine.config import STEP_BACKENDS  # noqa: E402
from calm_engine.engine.llm_engine import LLMEngine  # noqa: E402
from calm_engine.engine.step.interface import Phase  # noqa: E402
from calm_engine.engine.step.native_step import ISA_LEVELS  # noqa: E402
from calm_engine.engine.weights import ModelWeights  # noqa: E402


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int, avoid: set[int]) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in avoid]
    return [[rng.choice(allowed) for _ in range(prompt_len)] for _ in range(batch)]


def time_engine(llm: LLM, batch: int, prompt_len: int, new_tokens: int, params: SamplingParams, repeats: int) -> dict:
    """Median wall time of llm.generate over `repeats` runs (after one warm-up) and the decode-step time."""
    config = llm.model.config
    avoid = {config.pad_token_id, *config.eos_token_ids} - {None}
    prompts = random_prompts(config.vocab_size, batch, prompt_len, 0, avoid)
    llm.generate(prompts, params)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds.append(time.perf_counter() - start)
    steps = -(-new_tokens // llm.model.config.chunk_size)
    median = statistics.median(seconds)
    return {
        "seconds": median,
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "ms_per_step": 1e3 * median / steps,
        "tokens_per_s": batch * new_tokens / median,
    }


def step_matmuls(weights: ModelWeights, batch: int, samples: int) -> list[tuple[torch.Size, torch.Tensor]]:
    """(input shape, weight) of every linear layer one decode step runs, in order, at its row count."""
    shapes = weights.shapes
    k = shapes.chunk_size
    compression, head, decoder = weights.compression, weights.head, weights.decoder
    rows = batch * samples

    def at(count: int, *linears) -> list[tuple[tuple[int, int], torch.Tensor]]:
        return [((count, linear.in_features), linear.weight) for linear in linears]

    work = at(batch, compression.first, compression.second)
    for layer in weights.backbone.layers:
        work += at(batch, layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)
    work += at(batch, head.hidden_embed) + at(rows, head.noise_embed)
    for block in head.blocks:
        work += at(batch, block.hidden_half) + at(rows, block.noise_half, block.second, block.third, block.down)
    work += at(rows, head.final_first, head.final_second)
    work += at(rows, decoder.latent_to_hidden)
    for index, layer in enumerate(decoder.layers):
        work += at(rows if index < decoder.stage else rows * k, layer.mlp.gate_up, layer.mlp.down)
        if index == decoder.stage - 1:
            work += at(rows, decoder.expand)
    work.append(((rows * k, decoder.projection.shape[1]), decoder.projection))
    return work


def floor_products(weights: ModelWeights, batch: int, samples: int, screened: bool = False):
    """A function running the step's matrix products alone (inputs made beforehand); `screened`: the vocabulary
    projection in bfloat16, as the C++ step's screen computes it."""
    work = [(torch.randn(shape, dtype=weight.dtype), weight) for shape, weight in step_matmuls(weights, batch, samples)]
    projection = weights.decoder.projection
    if screened:
        projection = projection.bfloat16()
        work = [(x.bfloat16(), projection) if w is weights.decoder.projection else (x, w) for x, w in work]

    def run():
        for x, weight in work:
            if weight is not projection or x.shape[0] * weight.shape[0] <= ae_decode.MAX_BLOCK_LOGITS:
                F.linear(x, weight)
                continue
            # the vocabulary projection in the engine's blocks (ae_decode.project_argmax_ref), without the argmax
            row_block = min(x.shape[0], ae_decode.ROW_BLOCK)
            vocab_block = max(1, ae_decode.MAX_BLOCK_LOGITS // row_block)
            for part in x.split(row_block):
                for start in range(0, weight.shape[0], vocab_block):
                    F.linear(part, weight[start : start + vocab_block])

    return run


def time_steps_and_floor(llm: LLM, batch: int, prompt_len: int, params: SamplingParams, rounds: int) -> dict:
    """Medians (ms) of one engine step in steady state (prefill excluded) for `batch` running requests, of the same
    step's matrix products alone with a dense float32 projection (floor_ms) and, where the C++ step screens in
    bfloat16, with the bfloat16 projection (screen_floor_ms: the screen's own product); all alternate, so they see the
    same machine. On
    the C++ step at T < 1 also the step's split: head, decoder MLP, vocabulary argmax (screen and recomputation),
    counting and choice, and the rest (backbone, noise, Python), with the screen's candidates and fallbacks per row."""
    engine = llm.engine
    config = llm.model.config
    params = dataclasses.replace(params, max_tokens=(rounds + 2) * config.chunk_size)  # every timed step decodes
    prompts = random_prompts(config.vocab_size, batch, prompt_len, 1, {config.pad_token_id, *config.eos_token_ids})
    for i, prompt in enumerate(prompts):
        engine.add_request(f"floor-{i}", prompt, params)
    engine.step()  # prefill + first chunk
    native = engine.backends.native if decode_backend(engine, batch, params) == "native" else None
    pools = native is not None and params.samples_per_step > 1
    floors = {"floor_ms": floor_products(engine.weights, batch, params.samples_per_step)}
    # torch's bfloat16 product models the screen only where the CPU multiplies bfloat16; at avx2 the screen's products
    # are int8 (csrc/int8_products.h), which torch has no fast CPU product for, and its bfloat16 F.linear is emulated.
    if native is not None and native.screen_vocab and native.isa in ("avx512_bf16", "amx"):
        floors["screen_floor_ms"] = floor_products(engine.weights, batch, params.samples_per_step, screened=True)
    for floor in floors.values():
        floor()
    times = {name: [] for name in ["decode_step_ms", *floors]}
    for _ in range(rounds):
        start = time.perf_counter()
        engine.step()
        times["decode_step_ms"].append(1e3 * (time.perf_counter() - start))
        if pools:  # the last pool's split (one pool per step with the approximate sampler)
            stats = native.pool_stats
            split = {f"{part}_ms": 1e3 * stats[f"{part}_seconds"] for part in ("head", "decoder", "argmax")}
            split["choice_ms"] = 1e3 * native.choice_seconds
            split["rest_ms"] = times["decode_step_ms"][-1] - sum(split.values())
            split["candidates_per_row"] = stats["candidates"] / stats["rows"]
            split["fallback_rows_per_row"] = stats["fallback_rows"] / stats["rows"]
            for name, value in split.items():
                times.setdefault(name, []).append(value)
        for name, floor in floors.items():
            start = time.perf_counter()
            floor()
            times[name].append(1e3 * (time.perf_counter() - start))
    for i in range(batch):
        engine.abort(f"floor-{i}")
    return {name: statistics.median(values) for name, values in times.items()}


def decode_backend(engine: LLMEngine, batch: int, params: SamplingParams) -> str:
    """The backend the engine's policy picks for a decode step of `batch` requests sampled with `params` (the policy
    reads the rows' count and parameters only)."""
    return engine.backend_for(Phase.DECODE, [SimpleNamespace(params=params, prompt_chunks=1)] * batch).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--floor", action="store_true", help="also time the step's matrix products alone")
    parser.add_argument("--no-official", action="store_true")
    parser.add_argument("--no-cpu-step", action="store_true", help="the PyTorch path instead of the C++ step")
    parser.add_argument(
        "--step-backend", choices=STEP_BACKENDS, default="auto", help="force a backend (EngineConfig.step_backend)"
    )
    parser.add_argument(
        "--cpu-isa",
        choices=ISA_LEVELS,
        help="the C++ step's instruction-set level (default: $CALM_CPU_ISA, else the highest this CPU runs)",
    )
    parser.add_argument("--token-shape", help="a token-level shape of the same backbone (benchmarks/shapes.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = cached_checkpoint(args.shape)
    max_len = max(args.prompt_len) + args.new_tokens + 8
    llm = LLM(
        str(checkpoint),
        max_batch_size=max(args.batch),
        max_model_len=max_len,
        use_cpu_step=not args.no_cpu_step,
        cpu_isa=args.cpu_isa,
        step_backend=args.step_backend,
    )
    token_llm = None
    if args.token_shape:
        token_llm = LLM(str(cached_checkpoint(args.token_shape)), max_batch_size=max(args.batch), max_model_len=max_len)
    reason = "disabled" if args.no_official else official_unavailable_reason()
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unrestricted")
    print(
        f"# shape {args.shape}, {args.threads} threads, torch {torch.__version__}, MKL instructions {mkl}; "
        f"official: {reason or 'yes'}\n# {llm.engine.describe()}"
    )
    rows = []
    for prompt_len in args.prompt_len:
        for temperature in args.temperature:
            params = SamplingParams(
                temperature=temperature, max_tokens=args.new_tokens, num_samples=args.num_samples, ignore_eos=True
            )
            for batch in args.batch:
                row = {"batch": batch, "prompt_len": prompt_len, "temperature": temperature}
                row["decode_backend"] = decode_backend(llm.engine, batch, params)
                first = time_engine(llm, batch, prompt_len, args.new_tokens, params, args.repeats)
                if reason is None:
                    official = run_official(
                        checkpoint, batch=batch, prompt_len=prompt_len, new_tokens=args.new_tokens,
                        temperature=temperature, num_samples=args.num_samples, threads=args.threads,
                        repeats=args.repeats, warmup=1,
                    )  # fmt: skip
                    row["official_tokens_per_s"] = official["tokens_per_s"]
                    row["official_ms_per_step"] = official["ms_per_step"]
                second = time_engine(llm, batch, prompt_len, args.new_tokens, params, args.repeats)
                row["engine_tokens_per_s"] = statistics.mean([first["tokens_per_s"], second["tokens_per_s"]])
                row["engine_ms_per_step"] = statistics.mean([first["ms_per_step"], second["ms_per_step"]])
                if reason is None:
                    row["speedup_vs_official"] = row["engine_tokens_per_s"] / row["official_tokens_per_s"]
                if token_llm is not None:
                    token = time_engine(token_llm, batch, prompt_len, args.new_tokens, params, args.repeats)
                    row["token_llama_tokens_per_s"] = token["tokens_per_s"]
                    row["speedup_vs_token_llama"] = row["engine_tokens_per_s"] / token["tokens_per_s"]
                if args.floor:
                    timed = time_steps_and_floor(llm, batch, prompt_len, params, rounds=max(3, args.repeats))
                    row.update(timed, step_over_floor=timed["decode_step_ms"] / timed["floor_ms"])
                    if "screen_floor_ms" in timed:
                        row["step_over_screen_floor"] = timed["decode_step_ms"] / timed["screen_floor_ms"]
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()

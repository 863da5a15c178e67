"""Times the official implementation's `generate` on a checkpoint directory and prints one JSON line.

Standalone: run it with the official code's interpreter (transformers==4.43.0), the checkout in $CALM_OFFICIAL_DIR:
    CALM_OFFICIAL_DIR=<official checkout> <official python> benchmarks/official_generate.py --checkpoint DIR \
        --batch 8 --prompt-len 32 --new-tokens 64 --temperature 1 --threads 2
It imports nothing from calm_engine, so that interpreter needs only torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

OFFICIAL_DIR_ENV = "CALM_OFFICIAL_DIR"


def import_official_model_class():
    official_dir = os.environ.get(OFFICIAL_DIR_ENV)
    if not official_dir:
        raise SystemExit(f"${OFFICIAL_DIR_ENV} is not set: point it at a checkout of github.com/shaochenze/calm")
    if not Path(official_dir, "models", "modeling_energy.py").is_file():
        raise SystemExit(f"${OFFICIAL_DIR_ENV}={official_dir} holds no models/modeling_energy.py")
    sys.path.insert(0, official_dir)
    from models.modeling_energy import EnergyTransformer

    return EnergyTransformer


def load_official_model(checkpoint: Path):
    """The official EnergyTransformer in float32 with the checkpoint's weights, every one of them loaded."""
    energy_transformer = import_official_model_class()
    previous_dir = os.getcwd()
    # EnergyTransformer.__init__ opens config.ae_path relative to the working directory; our saver writes it
    # relative to the checkpoint folder.
    os.chdir(checkpoint)
    try:
        model, loading_info = energy_transformer.from_pretrained(
            str(checkpoint), torch_dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
        )
    finally:
        os.chdir(previous_dir)
    # The safetensors copy stores the generator once as mlp_generator.*; generative_head is the same module.
    missing = [key for key in loading_info["missing_keys"] if not key.startswith("generative_head.")]
    problems = {"missing": missing, "unexpected": loading_info["unexpected_keys"]}
    problems.update(mismatched=loading_info["mismatched_keys"], errors=loading_info["error_msgs"])
    if any(problems.values()):
        raise SystemExit(f"{checkpoint}: the official loader did not load every weight: {problems}")
    return model.eval()


def random_prompt_ids(model, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[batch, prompt_len] ids drawn uniformly from the vocabulary without pad and eos."""
    config = model.config
    allowed = torch.ones(config.vocab_size, dtype=torch.bool)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    for special in [config.pad_token_id, *eos]:
        if special is not None:
            allowed[special] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    return allowed_ids[torch.randint(len(allowed_ids), (batch, prompt_len), generator=generator)]


def prepare_for_benchmark(model, num_samples: int) -> list[int]:
    """Patches the loaded model so one generate call runs a known number of steps; returns the step counter.

    - generate calls temperature_sampling(hidden, temperature=T) without num_samples (so the pool is always the
      default 200): an instance attribute wrapping the official method passes --num-samples through, and counts
      the calls (one per decode step).
    - Random weights emit eos now and then, and generate stops once every row has; an eos id no token can equal
      keeps every row going to max_length, as the engine's ignore_eos does.
    """
    official_sampling = model.temperature_sampling
    step_counter = [0]

    def temperature_sampling(hidden_states, temperature=0.5):
        step_counter[0] += 1
        return official_sampling(hidden_states, temperature=temperature, num_samples=num_samples)

    model.temperature_sampling = temperature_sampling
    model.eos_token_id = -1
    return step_counter


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a CALM checkpoint folder in official layout")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32, help="a multiple of the patch size K")
    parser.add_argument("--new-tokens", type=int, default=64, help="a multiple of the patch size K")
    parser.add_argument("--temperature", type=float, default=1.0, help="1/n for an integer n (official rule)")
    parser.add_argument("--num-samples", type=int, default=200, help="candidate pool N when temperature < 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "num_samples", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.temperature <= 1 or not math.isclose(1 / args.temperature, round(1 / args.temperature)):
        parser.error(f"--temperature must be 1/n for an integer n >= 1 (official rule), got {args.temperature}")
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    args.checkpoint = args.checkpoint.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = time.perf_counter()
    model = load_official_model(args.checkpoint)
    load_seconds = time.perf_counter() - load_start
    patch_size = model.patch_size
    for name in ("prompt_len", "new_tokens"):
        # Otherwise generate pads the prompt or overshoots max_length by up to K-1 tokens, and steps are inexact.
        if getattr(args, name) % patch_size:
            raise SystemExit(f"--{name.replace('_', '-')} must be a multiple of K={patch_size}")
    steps = args.new_tokens // patch_size
    max_length = args.prompt_len + args.new_tokens
    step_counter = prepare_for_benchmark(model, args.num_samples)
    prompt_ids = random_prompt_ids(model, args.batch, args.prompt_len, args.seed)
    torch.manual_seed(args.seed)  # the head's noise
    random.seed(args.seed)  # temperature_sampling's choice among candidates

    repeat_seconds = []
    for run in range(args.warmup + args.repeats):
        step_counter[0] = 0
        start = time.perf_counter()
        output_ids = model.generate(prompt_ids, max_length=max_length, temperature=args.temperature)
        seconds = time.perf_counter() - start
        if tuple(output_ids.shape) != (args.batch, max_length) or step_counter[0] != steps:
            raise SystemExit(
                f"official generate returned shape {tuple(output_ids.shape)} after {step_counter[0]} steps; "
                f"expected ({args.batch}, {max_length}) after {steps}"
            )
        if run >= args.warmup:
            repeat_seconds.append(seconds)

    seconds = statistics.median(repeat_seconds)
    result = {
        "impl": "official",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "num_samples": args.num_samples,
        "seconds": seconds,
        "steps": steps,
        # The first step includes the prefill of the prompt.
        "ms_per_step": 1000 * seconds / steps,
        "tokens_per_s": args.batch * args.new_tokens / seconds,
        "seconds_min": min(repeat_seconds),
        "seconds_max": max(repeat_seconds),
        "repeat_seconds": repeat_seconds,
        "threads": args.threads,
        "load_seconds": load_seconds,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

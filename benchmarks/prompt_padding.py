"""The effect of the prompt-padding rule on a trained model: how often the first generated tokens equal the text's true
continuation, with the official rule (`prompt_padding="right"`: pads after the prompt's partial last chunk) and ours
(`"left"`: pads before the first chunk, so the model reads the prompt's last token just before generating).

    python benchmarks/prompt_padding.py --data OUT/corpus/heldout.jsonl [--model DIR] [--prompts 400]

Prompts are cut from the documents at random points, so their lengths mod K are spread evenly; the same prompts,
seeds and T go through both rules, and lengths that are whole chunks (no padding, both rules equal) are the control.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import calm_engine  # noqa: E402
from calm_engine import LLM, SamplingParams  # noqa: E402
from calm_engine.brierlm_cli import read_texts  # noqa: E402


def cut_prompts(texts: list[str], tokenizer, count: int, context: int, follow: int, seed: int):
    """(prompt ids, the true next `follow` ids) pairs with prompts of up to `context` tokens, cut at random points."""
    rng = random.Random(seed)
    documents = [ids for ids in (tokenizer.encode(t) for t in texts) if len(ids) > 2 * follow + 8]
    pairs = []
    while len(pairs) < count:
        ids = rng.choice(documents)
        end = rng.randrange(8, len(ids) - follow)
        start = max(0, end - rng.randrange(8, context))
        pairs.append((ids[start:end], ids[end : end + follow]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a CALM checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=Path, required=True, help="jsonl of documents the model was not trained on")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--follow", type=int, default=4, help="generated tokens compared with the true continuation")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = calm_engine.load(args.model)
    k = model.config.chunk_size
    context = min(256, model.config.max_chunks * k - args.follow - 2 * k)  # room for a padded prompt and the answer
    pairs = cut_prompts(read_texts(args.data), model.tokenizer, args.prompts, context, args.follow, args.seed)
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=args.follow, seed=args.seed + i, ignore_eos=True)
        for i in range(len(pairs))
    ]
    prompts = [prompt for prompt, _ in pairs]
    report = {"prompts": len(pairs), "chunk_size": k, "temperature": args.temperature, "rules": {}}
    for rule in ("right", "left"):
        outputs = LLM(model, max_batch_size=32, prompt_padding=rule).generate(prompts, params)
        by_remainder = {}
        for (prompt, truth), output in zip(pairs, outputs, strict=True):
            matches = [int(a == b) for a, b in zip(output.token_ids, truth, strict=False)]
            row = by_remainder.setdefault(len(prompt) % k, {"prompts": 0, "first_token": 0, "all_tokens": 0})
            row["prompts"] += 1
            row["first_token"] += matches[0]
            row["all_tokens"] += sum(matches) / len(truth)
        for row in by_remainder.values():
            row["first_token"] /= row["prompts"]
            row["all_tokens"] /= row["prompts"]
        report["rules"][rule] = dict(sorted(by_remainder.items()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

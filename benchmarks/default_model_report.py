"""The figures of the shipped default model's card, measured in one run: autoencoder accuracy (clean and at sigma 0.3),
BrierLM of the CALM model and of its token-level baseline, and their generation speed in the same engine.

    python benchmarks/default_model_report.py --corpus OUT/corpus \
        --wikitext ../shared/data/wikitext103_test_documents.jsonl

--corpus is the training run's corpus folder (its heldout.jsonl is never trained on); --models defaults to the
package's default_model/ folder. Speed alternates the two models within each setting (CALM, baseline, CALM, ...),
so their ratio is side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import calm_engine  # noqa: E402
from calm_engine import LLM, SamplingParams  # noqa: E402
from calm_engine.brierlm import BrierLMConfig, evaluate_brierlm  # noqa: E402
from calm_engine.brierlm_cli import read_texts  # noqa: E402
from calm_engine.model.checkpoint import DEFAULT_MODEL_DIR  # noqa: E402
from calm_engine.train.autoencoder import reconstruction_accuracy  # noqa: E402

SPEED_PROMPT = "The history of the city"


def chunk_aligned_ids(texts: list[str], tokenizer, chunk_size: int) -> torch.Tensor:
    """All texts' tokens, each text cut to whole chunks (the autoencoder encodes chunks on their own)."""
    ids = []
    for text in texts:
        tokens = tokenizer.encode(text)
        ids += tokens[: len(tokens) // chunk_size * chunk_size]
    return torch.tensor(ids, dtype=torch.int64)


def autoencoder_rows(model, sets: dict[str, list[str]]) -> list[dict]:
    rows = []
    for name, texts in sets.items():
        ids = chunk_aligned_ids(texts, model.tokenizer, model.config.chunk_size)
        generator = torch.Generator().manual_seed(0)
        rows.append(
            {
                "data": name,
                "tokens": ids.numel(),
                "accuracy": reconstruction_accuracy(model.autoencoder, ids),
                "accuracy_sigma_0.3": reconstruction_accuracy(model.autoencoder, ids, 0.3, generator),
            }
        )
    return rows


def brierlm_rows(models: dict, sets: dict[str, list[str]], block_size: int) -> list[dict]:
    rows = []
    for data, texts in sets.items():
        for name, model in models.items():
            result = evaluate_brierlm(model, texts, BrierLMConfig(block_size=block_size, seed=0))
            rows.append({"model": name, "data": data, **vars(result)})
            print(f"  brierlm {name} on {data}: {result.brierlm:.2f} ({result.seconds:.0f} s)", file=sys.stderr)
    return rows


def speed_rows(
    models: dict, batches: list[int], temperatures: list[float], new_tokens: int, repeats: int
) -> list[dict]:
    rows = []
    for temperature in temperatures:
        for batch in batches:
            llms = {name: LLM(model, max_batch_size=batch) for name, model in models.items()}
            params = SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True, seed=0)
            prompts = [SPEED_PROMPT] * batch
            for llm in llms.values():  # warm-up
                llm.generate(prompts, params)
            times = {name: [] for name in llms}
            for _ in range(repeats):
                for name, llm in llms.items():
                    start = time.perf_counter()
                    outputs = llm.generate(prompts, params)
                    times[name].append(time.perf_counter() - start)
                    assert all(len(o.token_ids) == new_tokens for o in outputs)
            row = {"batch": batch, "temperature": temperature}
            for name in llms:
                row[f"{name}_tokens_per_s"] = batch * new_tokens / statistics.median(times[name])
            row["calm_over_baseline"] = row["calm_tokens_per_s"] / row["token_baseline_tokens_per_s"]
            rows.append(row)
            print(f"  speed {row}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODEL_DIR, help="folder with calm/ and token_baseline/")
    parser.add_argument("--corpus", type=Path, required=True, help="the training run's corpus folder")
    parser.add_argument("--wikitext", type=Path, required=True, help="jsonl of evaluation documents")
    parser.add_argument("--wikitext-documents", type=int, default=None, help="the first D documents only")
    parser.add_argument("--block-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    models = {name: calm_engine.load(args.models / name) for name in ("calm", "token_baseline")}
    sets = {
        "held-out corpus": read_texts(args.corpus / "heldout.jsonl"),
        "wikitext-103 test": read_texts(args.wikitext, args.wikitext_documents),
    }
    report = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autoencoder": autoencoder_rows(models["calm"], sets),
        "brierlm": brierlm_rows(models, sets, args.block_size),
        "speed": speed_rows(models, args.batch, args.temperature, args.new_tokens, args.repeats),
    }
    print(json.dumps(report, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

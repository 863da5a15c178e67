"""`calm eval brierlm`: read a jsonl file of documents, score a checkpoint with calm_engine.brierlm, print the table.
Under `torchrun --nproc-per-node N` each rank scores every N-th block and rank 0 prints the whole result."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from calm_engine.brierlm import DEFAULT_BLOCK_SIZE, MAX_NGRAM, BrierLMConfig, BrierLMResult, Progress, evaluate_brierlm
from calm_engine.distributed.group import join_environment, local_device
from calm_engine.jsonl import read_records
from calm_engine.model.checkpoint import default_model_path, load


def read_texts(path: Path, max_documents: int | None = None) -> list[str]:
    """The "text" field of each line of a jsonl file (blank lines skipped)."""
    return [record["text"] for _, record in read_records(path, "text", "documents", max_documents)]


def format_result(result: BrierLMResult, data: str) -> str:
    lines = [f"BrierLM on {data}: {result.documents} documents, {result.tokens:,} tokens in {result.blocks} blocks"]
    if result.block_size != result.requested_block_size:
        lines.append(
            f"block size {result.requested_block_size} capped at the model's context: {result.block_size} tokens"
        )
    else:
        lines.append(f"block size {result.block_size} tokens")
    lines += [f"  Brier-{n:<8} {getattr(result, f'brier{n}'):.6f}" for n in range(1, MAX_NGRAM + 1)]
    lines += [
        f"  {'BrierLM':<14} {result.brierlm:.4f}   (100 x geometric mean of Brier-1..4, product clamped at 0)",
        f"  {'positions':<14} {result.positions:,}",
        f"  {'time':<14} {result.seconds:.1f} s ({result.positions / max(result.seconds, 1e-9):,.0f} positions/s)",
    ]
    negative = [f"Brier-{n}" for n in range(1, MAX_NGRAM + 1) if getattr(result, f"brier{n}") < 0]
    if negative:
        lines.append(
            f"  note: {', '.join(negative)} negative; the official clamp zeroes BrierLM only when the product is "
            "negative, so an even number of negative values still gives a positive BrierLM"
        )
    return "\n".join(lines)


class ProgressLine:
    """A progress line rewritten in place on a stream (stderr): blocks, documents, positions per second."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, progress: Progress) -> None:
        stream = self.stream or sys.stderr  # looked up when written: tests and callers may redirect sys.stderr
        rate = progress.positions / max(progress.seconds, 1e-9)
        stream.write(
            f"\rbrierlm: blocks {progress.blocks_done}/{progress.blocks}, documents {progress.documents_done}/"
            f"{progress.documents}, {rate:,.0f} positions/s"
        )
        if progress.blocks_done == progress.blocks:
            stream.write("\n")
        stream.flush()


def add_brierlm_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `calm eval brierlm`."""
    parser.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        default=None,
        help="a CALM or token-level Llama checkpoint (default: the default model)",
    )
    parser.add_argument("--data", type=Path, required=True, help="a jsonl file with a 'text' field per line")
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"tokens per block, capped at the model's context (default {DEFAULT_BLOCK_SIZE}, the official value)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="blocks per forward pass (default 1)")
    parser.add_argument("--max-documents", type=int, default=None, help="read only the first D documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    parser.add_argument(
        "--per-document",
        action="store_true",
        help="cut each document into its own blocks, the last one shorter, instead of the official protocol "
        "(all documents concatenated, cut into equal blocks, the remainder dropped)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="a tokenizer directory, if the checkpoint has none"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")


def run_brierlm(args: argparse.Namespace) -> int:
    """`calm eval brierlm`: print the result table; 2 on bad input, with the problem on stderr."""
    try:
        if args.max_documents is not None and args.max_documents < 1:
            raise ValueError(f"--max-documents must be at least 1, got {args.max_documents}")
        config = BrierLMConfig(
            block_size=args.block_size, batch_size=args.batch_size, seed=args.seed, per_document=args.per_document
        )
        texts = read_texts(args.data, args.max_documents)
        shard = join_environment()  # under torchrun: this rank's share of the blocks
        model = load(args.model_dir, dtype=args.dtype, device=local_device(args.device), tokenizer=args.tokenizer)
        result = evaluate_brierlm(model, texts, config, progress=ProgressLine(), shard=shard)
    except (OSError, ValueError) as error:
        print(f"calm eval brierlm: error: {error}", file=sys.stderr)
        return 2
    if not shard.is_main:
        return 0
    print(format_result(result, str(args.data)))
    if args.output is not None:
        scored = args.model_dir if args.model_dir is not None else default_model_path()
        record = {"model": str(scored), "data": str(args.data), "seed": args.seed}
        args.output.write_text(json.dumps({**record, **dataclasses.asdict(result)}, indent=2) + "\n")
    return 0

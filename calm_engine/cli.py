"""The `calm` command line: `calm inspect PATH` (config, parameter counts by component, dtype) of a CALM,
autoencoder or token-level Llama checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.checkpoint import CheckpointError, load, load_autoencoder, read_weights
from calm_engine.model.config import ConfigError
from calm_engine.model.token_llama import TokenLlama
from calm_engine.tokenizer import TokenizerError


def parameter_count(module: nn.Module) -> int:
    """Distinct parameters only: a tied weight counts once."""
    return sum(p.numel() for p in module.parameters())


def component_counts(model) -> list[tuple[str, int]]:
    """(component, parameters) rows for a CalmModel, an Autoencoder or a TokenLlama."""
    if isinstance(model, Autoencoder):
        return _autoencoder_rows(model, "")
    backbone = model.backbone
    rows = [
        ("backbone.embed_tokens", parameter_count(backbone.embed_tokens)),
        ("backbone.layers", parameter_count(backbone.layers)),
        ("backbone.norm", parameter_count(backbone.norm)),
    ]
    if isinstance(model, TokenLlama):
        tied = model.config.tie_word_embeddings
        return [*rows, ("lm_head (tied to the embedding)", 0) if tied else ("lm_head", parameter_count(model.lm_head))]
    return [
        *_autoencoder_rows(model.autoencoder, "autoencoder."),
        *rows,
        ("embed_proj (input compression)", parameter_count(model.embed_proj)),
        ("generative_head", parameter_count(model.generative_head)),
    ]


def _autoencoder_rows(autoencoder: Autoencoder, prefix: str) -> list[tuple[str, int]]:
    embedding = parameter_count(autoencoder.encoder.embed_tokens)
    decoder = parameter_count(autoencoder.decoder)
    decoder_label = f"{prefix}decoder"
    if autoencoder.weights_tied:
        decoder -= embedding
        decoder_label += " (output projection tied to the embedding)"
    return [
        (f"{prefix}encoder.embed_tokens", embedding),
        (f"{prefix}encoder (rest)", parameter_count(autoencoder.encoder) - embedding),
        (decoder_label, decoder),
    ]


def stored_dtypes(path: Path) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in read_weights(path).values()})
    return ", ".join(dtypes)


def inspect(path: Path, dtype: str) -> str:
    config_data = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    is_autoencoder = "Autoencoder" in (config_data.get("architectures") or [])
    model = load_autoencoder(path, dtype=dtype) if is_autoencoder else load(path, dtype=dtype)
    kind = "autoencoder" if is_autoencoder else "token-level Llama" if isinstance(model, TokenLlama) else "CALM"
    lines = [f"{kind} checkpoint: {path}", "", "config:"]
    lines += [f"  {key:<26} {json.dumps(value)}" for key, value in sorted(model.config.to_dict().items())]
    if kind == "CALM":
        lines += ["", "autoencoder config:"]
        lines += [f"  {k:<26} {json.dumps(v)}" for k, v in sorted(model.autoencoder.config.to_dict().items())]
    rows = component_counts(model)
    total = parameter_count(model)
    width = max(len(name) for name, _ in rows) + 2
    lines += ["", "parameters:"]
    lines += [f"  {name:<{width}} {count:>14,}" for name, count in rows]
    lines += [f"  {'total':<{width}} {total:>14,}"]
    dtype_now = next(model.parameters()).dtype
    lines += ["", f"dtype: {str(dtype_now).removeprefix('torch.')} (stored: {stored_dtypes(path)})"]
    if not is_autoencoder:
        tokenizer = model.tokenizer
        described = "none" if tokenizer is None else f"{type(tokenizer).__name__} ({tokenizer.vocab_size} tokens)"
        lines.append(f"tokenizer: {described}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm", description="Inference engine for CALM models.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="print a checkpoint's config, parameter counts and dtype")
    inspect_cmd.add_argument("path", type=Path, help="a CALM, autoencoder or token-level Llama checkpoint directory")
    inspect_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        if args.command == "inspect":
            print(inspect(args.path, args.dtype))
    except (CheckpointError, ConfigError, TokenizerError) as error:
        print(f"calm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

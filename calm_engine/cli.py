"""The `calm` command line.

calm generate [PROMPT ...]   continue prompts (arguments, else lines of stdin) with the default or a given model
calm generate --input prompts.jsonl --output out.jsonl   a file of prompts (under torchrun: sharded over the ranks)
calm inspect PATH            config, parameter counts by component and dtype of a checkpoint
calm serve                   an OpenAI-compatible HTTP server (calm_engine/serve/; needs `pip install -e '.[serve]'`)

Bad input of any kind ends with one line on stderr and exit status 2; Ctrl-C with one line and 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

import calm_engine
from calm_engine.brierlm_cli import add_brierlm_arguments, run_brierlm
from calm_engine.distributed.group import Shard, environment_world_size, join_environment, local_device
from calm_engine.engine.llm_engine import LLM
from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.checkpoint import is_autoencoder_checkpoint, load, load_autoencoder
from calm_engine.model.config import ConfigError
from calm_engine.model.token_llama import TokenLlama
from calm_engine.model.weight_files import CheckpointError, read_weights, resolve_device
from calm_engine.prompt_file import generate_file, read_prompts, write_outputs
from calm_engine.sampling_params import SamplingParams
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
        decoder_label += " (output projection tied, see note)"
    return [
        (f"{prefix}encoder.embed_tokens", embedding),
        (f"{prefix}encoder (rest)", parameter_count(autoencoder.encoder) - embedding),
        (decoder_label, decoder),
    ]


def stored_dtypes(path: Path) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in read_weights(path).values()})
    return ", ".join(dtypes)


def inspect(path: Path, dtype: str) -> str:
    is_autoencoder = is_autoencoder_checkpoint(path)
    model = load_autoencoder(path, dtype=dtype) if is_autoencoder else load(path, dtype=dtype)
    kind = "autoencoder" if is_autoencoder else "token-level Llama" if isinstance(model, TokenLlama) else "CALM"
    lines = [f"{kind} checkpoint: {path}", "", "config:"]
    lines += [f"  {key:<26} {json.dumps(value)}" for key, value in sorted(model.config.to_dict().items())]
    autoencoder = model if is_autoencoder else getattr(model, "autoencoder", None)
    if kind == "CALM":
        lines += ["", "autoencoder config:"]
        lines += [f"  {k:<26} {json.dumps(v)}" for k, v in sorted(autoencoder.config.to_dict().items())]
    rows = component_counts(model)
    total = parameter_count(model)
    width = max(len(name) for name, _ in rows) + 2
    lines += ["", "parameters:"]
    lines += [f"  {name:<{width}} {count:>14,}" for name, count in rows]
    lines += [f"  {'total':<{width}} {total:>14,}"]
    if autoencoder is not None and autoencoder.weights_tied:
        tie = json.dumps(autoencoder.config.tie_word_embeddings)
        lines += [
            "note: the autoencoder's output projection is its embedding, counted once: the official Autoencoder ties",
            f"      them whatever its config's tie_word_embeddings says (here {tie}), unless the checkpoint stores a",
            "      different decoder.lm_head_weight",
        ]
    dtype_now = next(model.parameters()).dtype
    lines += ["", f"dtype: {str(dtype_now).removeprefix('torch.')} (stored: {stored_dtypes(path)})"]
    if not is_autoencoder:
        tokenizer = model.tokenizer
        described = "none" if tokenizer is None else f"{type(tokenizer).__name__} ({tokenizer.vocab_size} tokens)"
        lines.append(f"tokenizer: {described}")
    return "\n".join(lines)


def generate(args: argparse.Namespace) -> None:
    """Continue every prompt; a single prompt streams to stdout as it is generated, several print when done."""
    if args.input is not None or args.output is not None:
        return generate_file_command(args)
    if environment_world_size() > 1 and args.tensor_parallel_size == 1:
        raise ValueError(
            "under torchrun give the prompts as --input FILE --output FILE (each rank takes a share), or shard one "
            "engine over the ranks with --tensor-parallel-size N"
        )
    prompts = [_utf8_text(p, f"prompt argument {i + 1}") for i, p in enumerate(args.prompts)] or _stdin_prompts()
    if not prompts:
        raise ValueError("no prompt: give prompts as arguments or one per line on stdin")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.seed is not None and not 0 <= args.seed <= 2**63 - len(prompts):
        raise ValueError(
            f"--seed {args.seed}: prompt i uses seed + i, so with {len(prompts)} prompt(s) the seed must be in "
            f"[0, 2**63 - {len(prompts)}]"
        )
    params = [
        SamplingParams(
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            num_samples=args.num_samples,
            seed=None if args.seed is None else args.seed + i,
        )
        for i in range(len(prompts))
    ]
    device = resolve_device(args.device)
    llm = LLM(
        args.model, device=device, dtype=args.dtype, max_batch_size=min(args.batch, len(prompts)),
        tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip
    if llm.model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer, so it cannot take text prompts")
    if args.verbose:
        print(llm.engine.describe(), file=sys.stderr)
    if len(prompts) == 1 and not args.no_stream:
        _stream(llm, prompts[0], params[0])
        return
    for i, output in enumerate(llm.generate(prompts, params)):
        separator = "\n" if i < len(prompts) - 1 else ""
        sys.stdout.write(f"{prompts[i]}{output.text}\n{separator}")


def generate_file_command(args: argparse.Namespace) -> None:
    """--input prompts.jsonl --output out.jsonl (prompt_file.py); under torchrun each rank takes every N-th prompt."""
    if args.input is None or args.output is None or args.prompts:
        raise ValueError("--input and --output go together, without prompt arguments")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    records = read_prompts(args.input)
    if args.seed is not None and not 0 <= args.seed <= 2**63 - len(records):
        raise ValueError(f"--seed {args.seed}: prompt i uses seed + i, so it must be in [0, 2**63 - {len(records)}]")

    def params_for(index: int, line_seed: int | None) -> SamplingParams:
        seed = line_seed if line_seed is not None else None if args.seed is None else args.seed + index
        return SamplingParams(
            temperature=args.temperature, max_tokens=args.max_tokens, num_samples=args.num_samples, seed=seed
        )

    # Under torchrun: data parallel (each rank a shard of the prompts), or with --tensor-parallel-size N one engine
    # over the N ranks (joined inside LLM; ranks > 0 serve rank 0 there and exit when it is done).
    shard = join_environment() if args.tensor_parallel_size == 1 else Shard()
    device = resolve_device(local_device(args.device))
    llm = LLM(
        args.model, device=device, dtype=args.dtype, max_batch_size=min(args.batch, len(records)),
        tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip
    if args.verbose and shard.is_main:
        print(llm.engine.describe(), file=sys.stderr)
    try:
        outputs = generate_file(llm, records, params_for, shard)
    finally:
        llm.close()
    if outputs is not None:
        write_outputs(args.output, outputs)


def _utf8_text(text: str | bytes, where: str) -> str:
    """Text as UTF-8 allows, else a ValueError naming where it came from. Python hands over undecodable bytes of
    argv and stdin as lone surrogates (surrogateescape); they are turned back into the bytes they were."""
    try:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise ValueError(
            f"{where} holds a lone surrogate (U+{ord(bad):04X} at index {error.start}), not text"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where} is not valid UTF-8 (byte 0x{error.object[error.start]:02x} at byte {error.start})"
        ) from None


def _stdin_prompts() -> list[str]:
    """One prompt per non-blank line of stdin; a hint on stderr when it is a terminal, where the wait looks like a
    hang."""
    if sys.stdin.isatty():
        print("calm generate: reading prompts from stdin, one per line; end with Ctrl-D", file=sys.stderr)
    buffer = getattr(sys.stdin, "buffer", None)  # bytes, so that a bad line is reported as such
    lines = (buffer.read() if buffer is not None else sys.stdin.read()).splitlines()
    texts = [_utf8_text(line, f"stdin line {number}") for number, line in enumerate(lines, 1)]
    return [text for text in texts if text.strip()]


def _stream(llm: LLM, prompt: str, params: SamplingParams) -> None:
    """Print the prompt, then the continuation as each step's K tokens arrive. The text is re-decoded from all ids
    so far, because a byte-level token can end inside a UTF-8 character; an incomplete character waits a step."""
    engine, tokenizer = llm.engine, llm.model.tokenizer
    shown = None  # the text printed so far; None until the prompt is
    try:  # Ctrl-C included, at any point: no request is left in the engine and the printed line is ended
        engine.add_request("cli", prompt, params)
        shown = ""
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while engine.has_unfinished_requests():
            for output in engine.step():
                text = output.text if output.finished else tokenizer.decode(output.token_ids).rstrip("\ufffd")
                if text.startswith(shown):
                    sys.stdout.write(text[len(shown) :])
                    sys.stdout.flush()
                    shown = text
    finally:
        engine.abort("cli")
        if shown is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()


def train(args: argparse.Namespace) -> None:
    from calm_engine.train.recipe import DEFAULT_RECIPE, QUICK_RECIPE, STAGES, train_default_model

    recipe = QUICK_RECIPE if args.quick else DEFAULT_RECIPE
    train_default_model(args.out, recipe, python_docs_dir=args.python_docs, stages=tuple(args.stages or STAGES))


class _Parser(argparse.ArgumentParser):
    """argparse's parser with usage errors on one line, as every other error of the command is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="calm", description="Inference engine for CALM models.")
    parser.add_argument("--version", action="version", version=f"calm-engine {calm_engine.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    generate_cmd = commands.add_parser("generate", help="continue prompts (arguments, else lines of stdin)")
    generate_cmd.add_argument("prompts", nargs="*", help="prompt texts; without any, one prompt per line of stdin")
    generate_cmd.add_argument("--model", default=None, help="a checkpoint directory (default: the shipped model)")
    generate_cmd.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="in (0, 1] (default 0.5, sharper text to read, as the paper samples; the API's SamplingParams defaults "
        "to 1, the model's own distribution and the fast path)",
    )
    generate_cmd.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    generate_cmd.add_argument(
        "--num-samples", type=int, default=200, help="head samples per step when T < 1 (default 200)"
    )
    generate_cmd.add_argument("--seed", type=int, default=None, help="prompt i uses seed + i (default: random)")
    generate_cmd.add_argument("--batch", type=int, default=64, help="requests decoded together at most (default 64)")
    generate_cmd.add_argument(
        "--no-stream",
        action="store_true",
        help="print a single prompt's output when done (a progress bar on a terminal)",
    )
    generate_cmd.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks one engine is sharded over (default 1)"
    )
    generate_cmd.add_argument("--input", type=Path, default=None, help='a jsonl file of {"prompt": ...} lines')
    generate_cmd.add_argument("--output", type=Path, default=None, help="write {prompt, output, ...} lines here")
    generate_cmd.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    generate_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate_cmd.add_argument(
        "--verbose", action="store_true", help="print what the engine resolved (device, backends, ISA level) to stderr"
    )
    eval_cmd = commands.add_parser("eval", help="evaluate a model")
    metrics = eval_cmd.add_subparsers(dest="metric", required=True)
    add_brierlm_arguments(metrics.add_parser("brierlm", help="BrierLM (Brier-1..4) on a jsonl of documents"))
    train_cmd = commands.add_parser("train", help="train the default model's recipe into a folder")
    train_cmd.add_argument("out", type=Path, help="output folder (one subfolder per stage)")
    train_cmd.add_argument("--quick", action="store_true", help="a minuscule model in under two minutes")
    train_cmd.add_argument(
        "--python-docs", type=Path, default=None, help="the python3.11-doc package extracted with dpkg-deb -x"
    )
    train_cmd.add_argument("--stages", nargs="+", default=None, help="corpus tokenizer autoencoder calm token_baseline")
    add_serve_arguments(commands.add_parser("serve", help="an OpenAI-compatible server (POST /v1/completions)"))
    inspect_cmd = commands.add_parser("inspect", help="print a checkpoint's config, parameter counts and dtype")
    inspect_cmd.add_argument("path", type=Path, help="a CALM, autoencoder or token-level Llama checkpoint directory")
    inspect_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def add_serve_arguments(serve_cmd: argparse.ArgumentParser) -> None:
    serve_cmd.add_argument("--model", default=None, help="a checkpoint directory (default: the shipped model)")
    serve_cmd.add_argument("--served-model-name", default=None, help="the `model` id clients send")
    serve_cmd.add_argument("--tokenizer", default=None, help="a tokenizer directory, for a checkpoint without one")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve_cmd.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve_cmd.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or CALM_API_KEY)")
    serve_cmd.add_argument("--max-batch-size", type=int, default=64, help="KV slots: requests decoded together")
    serve_cmd.add_argument("--max-model-len", type=int, default=None, help="context in tokens (default: the model's)")
    serve_cmd.add_argument("--max-waiting", type=int, default=256, help="requests queued for a slot before 503s")
    serve_cmd.add_argument("--max-num-samples", type=int, default=4096, help="largest num_samples a request may ask")
    serve_cmd.add_argument("--max-body-size", type=int, default=1 << 20, help="bytes; larger bodies get 413")
    serve_cmd.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks the engine is sharded over (default 1)"
    )
    serve_cmd.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    serve_cmd.add_argument("--stream-interval", type=int, default=1, help="engine steps per streamed event")
    serve_cmd.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish running requests")
    serve_cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve_cmd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def serve(args: argparse.Namespace) -> int:
    try:
        from calm_engine.serve.server import main as serve_main
    except ImportError as error:
        raise ValueError(f"calm serve needs the serve extra ({error}): pip install -e '.[serve]'") from None
    return serve_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate" and args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # Gradients only for training; the context restores the caller's mode (tests call main in-process).
    with torch.set_grad_enabled(args.command == "train"):
        try:
            return _run(args)
        except KeyboardInterrupt:
            print(f"calm {args.command}: interrupted", file=sys.stderr)
            return 130


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "inspect":
            print(inspect(args.path, args.dtype))
        elif args.command == "generate":
            generate(args)
        elif args.command == "train":
            train(args)
        elif args.command == "eval":
            return run_brierlm(args)
        elif args.command == "serve":
            return serve(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as error:
        print(f"calm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

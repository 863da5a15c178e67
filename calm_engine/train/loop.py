"""What the CALM and token-level trainers share: the loop settings, initialisation, AdamW with warmup, the step loop
with its loss / tokens-per-second log, and held-out evaluation on fixed windows."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calm_engine.train.windows import random_windows

SCHEDULES = ("constant", "cosine")
# The cosine schedule ends at this fraction of the peak lr rather than 0, so the last steps still learn.
COSINE_FLOOR = 0.1
ADAM_BETAS = (0.9, 0.95)  # the official train_*.sh scripts


@dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's special token ids, written into the saved config.json."""

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def check(self, vocab_size: int) -> None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(f"special id {name} must be a token id in [0, vocab_size={vocab_size}), got {value!r}")


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the training loop shared by every trainer. Windows are `window_tokens` tokens of the stream."""

    window_tokens: int = 256
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 4
    # bfloat16 autocast for the forward and backward (weights and AdamW stay float32), as the official scripts train;
    # on a 2-core AMX Xeon its 4096x256x1024 matmul ran 2.1x and a CALM training step 1.2-1.5x as fast as float32.
    bf16: bool = False

    def __post_init__(self):
        for name in (
            "window_tokens",
            "batch_size",
            "steps",
            "threads",
            "log_interval",
            "eval_interval",
            "eval_batches",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(self.weight_decay, bool) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.eval_interval % self.log_interval:
            raise ValueError(
                f"eval_interval ({self.eval_interval}) must be a multiple of log_interval ({self.log_interval})"
            )
        if not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be true or false, got {self.bf16!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_stream(name: str, stream: torch.Tensor, vocab_size: int, window_tokens: int) -> None:
    """A 1-D int64 stream of token ids in the vocabulary, long enough for one window."""
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1 or stream.dtype != torch.int64:
        shape = list(stream.shape) if isinstance(stream, torch.Tensor) else type(stream).__name__
        raise ValueError(f"{name} must be a 1-D int64 tensor of token ids, got {shape}")
    if stream.numel() < window_tokens:
        raise ValueError(f"{name} has {stream.numel()} tokens, fewer than one window of {window_tokens}")
    low, high = int(stream.min()), int(stream.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def init_weights_(
    module: nn.Module, std: float, generator: torch.Generator | None = None, pad_token_id: int | None = None
) -> None:
    """transformers' Llama initialisation, which the official trainers get from `post_init`: every linear and
    embedding N(0, std), biases 0, the pad embedding row 0 (the official embedding has padding_idx); norms keep
    their constructor values (ones, zero bias)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, 0.0, std, generator=generator)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            sub.bias.zero_()
    # A second pass, so that a linear tied to an embedding (the token LM's tied head) cannot refill the pad row.
    for sub in module.modules():
        if isinstance(sub, nn.Embedding) and pad_token_id is not None:
            sub.weight[pad_token_id].zero_()


def make_optimizer(params: list[tuple[str, nn.Parameter]], config: LoopConfig) -> torch.optim.AdamW:
    """AdamW; like transformers' Trainer, biases and norm weights (the 1-D parameters) get no weight decay."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS)


def warmup_cosine(step: int, lr: float, warmup_steps: int, steps: int, floor: float = COSINE_FLOOR) -> float:
    """Linear warmup over warmup_steps, then cosine decay down to floor * lr at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, config: LoopConfig) -> float:
    """Linear warmup over warmup_steps, then constant or cosine down to COSINE_FLOOR * lr at the last step."""
    if config.schedule == "constant" and step >= config.warmup_steps:
        return config.lr
    return warmup_cosine(step, config.lr, config.warmup_steps, config.steps)


def eval_windows(stream: torch.Tensor, config: LoopConfig) -> list[torch.Tensor]:
    """The fixed held-out batches every evaluation uses, so that evaluations are comparable across steps."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    return [
        random_windows(stream, config.batch_size, config.window_tokens, generator) for _ in range(config.eval_batches)
    ]


def train_loop(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    config: LoopConfig,
    train_stream: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    log: Callable[[str], None],
) -> dict:
    """Run config.steps AdamW steps of `loss_fn(windows [batch, window_tokens]) -> scalar loss` on random windows of
    the train stream; `evaluate()` every eval_interval steps and at the end. Runs with config.threads torch threads.

    Returns the final metrics: train_loss (mean of the last log interval), the last evaluation's numbers,
    tokens_per_second (window tokens through forward + backward + update), seconds, steps and a history of
    (step, train_loss, evaluation) rows.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        optimizer = make_optimizer(params, config)
        generator = torch.Generator().manual_seed(config.seed)
        history, recent, evaluation, train_loss = [], [], {}, math.nan
        tokens_per_step = config.batch_size * config.window_tokens
        start = interval_start = time.perf_counter()
        train_seconds = 0.0
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            model.train()
            windows = random_windows(train_stream, config.batch_size, config.window_tokens, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = loss_fn(windows)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss.item()} at step {step}; lower lr or grad_clip")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
            optimizer.step()
            recent.append(loss.item())
            done = step + 1
            if done % config.log_interval and done < config.steps:
                continue
            seconds = time.perf_counter() - interval_start
            train_seconds += seconds
            train_loss = sum(recent) / len(recent)
            log(
                f"step {done}/{config.steps}  loss {train_loss:.4f}  lr {lr_at(step, config):.2e}  "
                f"{len(recent) * tokens_per_step / seconds:.0f} tok/s"
            )
            recent = []
            if done % config.eval_interval == 0 or done == config.steps:
                model.eval()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    evaluation = evaluate()
                log(f"step {done}/{config.steps}  held-out " + "  ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
                history.append({"step": done, "train_loss": train_loss, **evaluation})
            interval_start = time.perf_counter()  # evaluation time is not training time
        model.eval()
        return {
            "steps": config.steps,
            "train_loss": train_loss,
            **evaluation,
            "tokens_per_second": config.steps * tokens_per_step / train_seconds,
            "seconds": time.perf_counter() - start,
            "history": history,
        }
    finally:
        torch.set_num_threads(previous_threads)


def copy_tokenizer(tokenizer_json: str | Path | None, out_dir: Path) -> None:
    """Put the tokenizer beside the weights, where calm_engine.load looks for it."""
    if tokenizer_json is None:
        return
    source = Path(tokenizer_json)
    if source.is_dir():
        source = source / "tokenizer.json"
    if not source.is_file():
        raise ValueError(f"no tokenizer.json at {source}")
    shutil.copyfile(source, out_dir / "tokenizer.json")


def count_parameters(params: list[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)

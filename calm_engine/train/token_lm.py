"""The token-level baseline: the same Llama backbone with an LM head, one token per position (K = 1), trained with
cross-entropy and saved as a Hugging Face `LlamaForCausalLM` checkpoint that `calm_engine.load` and the engine serve.

The LM head is untied from the input embedding by default, as in the official baseline (`train_ar.sh` trains a
transformers Llama, whose tie_word_embeddings defaults to false), so the comparison with CALM is like the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from calm_engine.model.config import TokenLlamaConfig
from calm_engine.model.token_llama import TokenLlama, save_token_llama
from calm_engine.train.loop import (
    LoopConfig,
    SpecialIds,
    check_stream,
    copy_tokenizer,
    count_parameters,
    eval_windows,
    init_weights_,
    train_loop,
)


@dataclass(frozen=True)
class TokenLmTrainConfig(LoopConfig):
    """The token-level Llama to train and how. The saved model's context is window_tokens tokens."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    tie_word_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not 0 < self.init_std < math.inf:
            raise ValueError(f"init_std must be a positive finite number, got {self.init_std!r}")
        if self.window_tokens < 2:
            raise ValueError(f"window_tokens must be >= 2 (one input, one target), got {self.window_tokens}")

    def model_config(self, vocab_size: int, special: SpecialIds) -> TokenLlamaConfig:
        config = TokenLlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.window_tokens,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=special.pad_token_id,
            bos_token_id=special.bos_token_id,
            eos_token_id=special.eos_token_id,
            initializer_range=self.init_std,
        )
        config.validate()
        return config


def token_lm_loss(model: TokenLlama, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over windows [B, T]: position t predicts token t+1."""
    logits = model.logits(model.backbone(model.backbone.embed_tokens(windows[:, :-1])))
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def token_accuracy(model: TokenLlama, windows: torch.Tensor) -> torch.Tensor:
    """Fraction of next tokens the greedy (argmax) prediction gets right."""
    logits = model.logits(model.backbone(model.backbone.embed_tokens(windows[:, :-1])))
    return (logits.argmax(-1) == windows[:, 1:]).float().mean()


def train_token_lm(
    config: TokenLmTrainConfig,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    vocab_size: int,
    special_ids: SpecialIds,
    out_dir: str | Path,
    *,
    tokenizer_json: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the token-level baseline and save it to `out_dir` (config.json + model.safetensors, and the tokenizer
    copied from `tokenizer_json` when given), which `calm_engine.load` and `calm_engine.LLM` then read.

    Returns train_loss / heldout_loss (cross-entropy, nats per token), heldout_accuracy, tokens_per_second, seconds,
    parameters and the evaluation history.
    """
    special_ids.check(vocab_size)
    model_config = config.model_config(vocab_size, special_ids)
    check_stream("train_stream", train_stream, vocab_size, config.window_tokens)
    check_stream("heldout_stream", heldout_stream, vocab_size, config.window_tokens)

    model = TokenLlama(model_config)
    init_weights_(model, config.init_std, torch.Generator().manual_seed(config.seed), special_ids.pad_token_id)
    params = list(model.named_parameters())  # a tied head is one parameter, listed once
    log(f"token LM: {count_parameters(params) / 1e6:.2f}M parameters")
    heldout = eval_windows(heldout_stream, config)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {
            "heldout_loss": torch.stack([token_lm_loss(model, w) for w in heldout]).mean().item(),
            "heldout_accuracy": torch.stack([token_accuracy(model, w) for w in heldout]).mean().item(),
        }

    metrics = train_loop(model, params, config, train_stream, lambda w: token_lm_loss(model, w), evaluate, log)
    out_dir = Path(out_dir)
    save_token_llama(model.requires_grad_(False), out_dir)
    copy_tokenizer(tokenizer_json, out_dir)
    log(f"saved to {out_dir}")
    return {**metrics, "parameters": count_parameters(params)}

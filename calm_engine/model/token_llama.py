"""TokenLlama: the token-level baseline (K = 1), the same Llama backbone as CALM plus an LM head.

The comparison CALM exists to beat: the engine drives it like a CALM model (one token per step instead of K), and
its checkpoints are Hugging Face `LlamaForCausalLM` folders (`model.*` backbone, `lm_head.weight`), which
`calm_engine.load` recognises by the config's architectures / model_type.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from calm_engine.model.calm import check_backbone_input
from calm_engine.model.config import TokenLlamaConfig
from calm_engine.model.llama import KVCache, LlamaBackbone
from calm_engine.model.weight_files import (
    CheckpointError,
    cast_weights,
    check_weights,
    raise_problems,
    read_weights,
    tokenizer_for,
    write_weights,
)

# Hugging Face prefix -> ours, and the output projection's name (the same in both).
HF_BACKBONE_PREFIX, BACKBONE_PREFIX = "model.", "backbone."
LM_HEAD_KEY = "lm_head.weight"
EMBEDDING_KEY = BACKBONE_PREFIX + "embed_tokens.weight"
# Rotary frequencies that transformers < 4.31 stored as buffers; recomputed here from the config.
STALE_SUFFIX = ".rotary_emb.inv_freq"


class TokenLlama(nn.Module):
    def __init__(self, config: TokenLlamaConfig):
        super().__init__()
        self.config = config
        self.backbone = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight
        self.tokenizer = None  # set by the loader when the checkpoint has one

    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm.weight.dtype

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `capacity` tokens (default: the model's context)."""
        capacity = self.config.max_chunks if capacity is None else capacity
        if not 0 < capacity <= self.config.max_chunks:
            raise ValueError(f"cache capacity must be in [1, {self.config.max_chunks}] tokens, got {capacity}")
        return KVCache(self.config, batch_size, capacity, self.device, self.dtype)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Backbone output for ids [B, n] -> [B, n, hidden]; with a cache the ids continue the cached sequences."""
        check_backbone_input(self.config, ids, cache)
        return self.backbone(self.backbone.embed_tokens(ids), cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> next-token logits [..., vocab]."""
        return self.lm_head(hidden)


def is_token_llama_checkpoint(directory: Path) -> bool:
    """Whether the directory's config.json names a Hugging Face Llama (architectures or model_type) rather than a
    CALM model. An unreadable config.json is left to the CALM loader, whose errors say what is wrong with it."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures")
    named = isinstance(architectures, list) and TokenLlamaConfig.ARCHITECTURE in architectures
    return named or config.get("model_type") == TokenLlamaConfig.MODEL_TYPE


def load_token_llama(
    directory: Path, *, device: torch.device, dtype: torch.dtype, tokenizer: str | Path | None = None
) -> TokenLlama:
    """A `LlamaForCausalLM` checkpoint directory as an inference-ready TokenLlama (eval, no grads); strict names.

    With tie_word_embeddings the checkpoint may omit lm_head.weight; if it stores one, it must equal the embedding.
    """
    config = TokenLlamaConfig.from_file(directory)
    weights = {_our_name(k): v for k, v in read_weights(directory).items() if not k.endswith(STALE_SUFFIX)}
    with torch.device("meta"):
        model = TokenLlama(config)
    expected = model.state_dict()
    optional = set()
    if config.tie_word_embeddings:
        optional.add(LM_HEAD_KEY)
        expected.pop(LM_HEAD_KEY, None)  # a tied Parameter appears under both names
        if LM_HEAD_KEY in weights:
            lm_head = weights.pop(LM_HEAD_KEY)
            embedding = weights.get(EMBEDDING_KEY)
            if embedding is not None and (lm_head.shape != embedding.shape or not torch.equal(lm_head, embedding)):
                raise CheckpointError(
                    f"{directory}: config.json sets tie_word_embeddings but {LM_HEAD_KEY} differs from "
                    f"{_hf_name(EMBEDDING_KEY)}; set tie_word_embeddings to false to keep a separate output projection"
                )
    raise_problems(directory, check_weights(expected, weights, optional=optional, name=_hf_name))
    model.load_state_dict(cast_weights(weights, dtype, device), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embed_tokens.weight  # assign=True replaced the tied Parameter
    assert not any(t.is_meta for t in model.state_dict().values()), "a parameter was left unloaded"
    model.tokenizer = tokenizer_for(directory, tokenizer, config.pad_token_id)
    return model.eval().requires_grad_(False)


def save_token_llama(model: TokenLlama, directory: str | Path) -> None:
    """Write config.json (LlamaForCausalLM) + model.safetensors in the Hugging Face names; a tied lm_head is not
    stored (safetensors cannot alias; transformers re-ties it from the config)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {_hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state[LM_HEAD_KEY]
    write_weights(state, directory, safetensors=True)


def _our_name(key: str) -> str:
    return BACKBONE_PREFIX + key[len(HF_BACKBONE_PREFIX) :] if key.startswith(HF_BACKBONE_PREFIX) else key


def _hf_name(key: str) -> str:
    return HF_BACKBONE_PREFIX + key[len(BACKBONE_PREFIX) :] if key.startswith(BACKBONE_PREFIX) else key

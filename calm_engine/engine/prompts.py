"""Prompts as the user gives them (text, ids, tensors, arrays) -> validated token ids, padded to whole chunks."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def prompt_ids(prompt: str | Sequence[int], tokenizer, vocab_size: int) -> list[int]:
    """One prompt's token ids; a clear error for anything but text (given a tokenizer) or ids in the vocabulary."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer, and this model has none: pass token ids")
        check_text(prompt)
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError(
            f"the prompt is {type(prompt).__name__} ({short(prompt)}): decode it to a str for text, "
            "or pass a list of token ids"
        )
    elif isinstance(prompt, (torch.Tensor, np.ndarray)):
        if prompt.ndim != 1:
            raise ValueError(f"a prompt of token ids must be 1-D, got shape {list(prompt.shape)}")
        ids = prompt.tolist()
    elif isinstance(prompt, Iterable):
        ids = list(prompt)
    else:
        raise TypeError(f"a prompt must be a str or a sequence of token ids, got {short(prompt)}")
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise ValueError(f"prompt token {token!r} is not an id in the vocabulary [0, {vocab_size})")
    return [int(token) for token in ids]


def pad_prompt(ids: list[int], chunk_size: int, pad_id: int | None, padding: str) -> list[int]:
    """The prompt as the model reads it: whole chunks, a partial one padded with pad_id on the `padding` side."""
    missing = -len(ids) % chunk_size
    if not missing:
        return ids
    if pad_id is None:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, not a multiple of K={chunk_size}, and the model config has "
            "no pad_token_id to fill its partial chunk: give a prompt of whole chunks"
        )
    return ids + [pad_id] * missing if padding == "right" else [pad_id] * missing + ids


def prompt_list(prompts) -> list:
    """LLM.generate's prompts argument as a list of single prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        if prompts.ndim == 1:
            return [prompts]
        if prompts.ndim == 2:
            return list(prompts)
        raise ValueError(
            f"prompts as a tensor must be 1-D (one prompt) or 2-D (a prompt per row), got shape {list(prompts.shape)}"
        )
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError(
            f"prompts is {type(prompts).__name__} ({short(prompts)}): decode it to a str for text, or "
            "pass a list of token ids"
        )
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of those, got {short(prompts)}")
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], numbers.Integral) and not isinstance(prompts[0], bool):
        return [prompts]  # a list of ids is one prompt
    return prompts


def check_text(text: str) -> None:
    """Text the tokenizer can take: a lone surrogate (e.g. from bytes decoded with errors="surrogateescape") is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the prompt is not valid text: {text[error.start]!r} at index {error.start} is a lone surrogate "
            f"(U+{ord(text[error.start]):04X}), which no UTF-8 text holds"
        ) from None


def short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

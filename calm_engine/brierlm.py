"""BrierLM (shared CALM.md section 3): the likelihood-free language-model score of CALM models and token-level
Llamas over a text file, as the official evaluation computes it; `calm eval brierlm` (brierlm_cli.py) runs
it over a file.

Brier(P, y) = 2 P(y) - sum_x P(x)^2 is estimated without likelihoods from two samples x1, x2 ~ P as
1{x1 = y} + 1{x2 = y} - 1{x1 = x2}; Brier-n treats the n tokens after a position as one outcome, and
BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from calm_engine.brier_estimates import MAX_NGRAM, brier_estimates, rollout_steps
from calm_engine.distributed.group import Shard
from calm_engine.model.calm import CalmModel
from calm_engine.model.token_llama import TokenLlama

DEFAULT_BLOCK_SIZE = 8192  # the official evaluation's block_size (train_calm.py), in tokens


@dataclass(frozen=True)
class BrierLMConfig:
    """How a text file is cut and scored.

    block_size: tokens per block, capped at the model's context; the official default is 8192.
    batch_size: blocks per forward pass.
    seed: with a block's index, seeds the generator of the block's samples (block_generator).
    per_document: cut each document into its own blocks (the last one shorter, padded in the batch and masked out)
        instead of the official protocol: all documents concatenated, cut into equal blocks, the remainder dropped.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    batch_size: int = 1
    seed: int = 0
    per_document: bool = False

    def __post_init__(self):
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class BrierLMResult:
    """Brier-1..4 averaged over every scored position of every block, and BrierLM (x100, as the paper reports it).

    positions: the scored start positions (the averages' denominator); tokens: the tokens in the scored blocks;
    block_size: the block size used (requested_block_size capped at the model's context).
    """

    brier1: float
    brier2: float
    brier3: float
    brier4: float
    brierlm: float
    positions: int
    documents: int
    tokens: int
    blocks: int
    block_size: int
    requested_block_size: int
    seconds: float


@dataclass(frozen=True)
class Progress:
    blocks_done: int
    blocks: int
    documents_done: int
    documents: int
    positions: int
    seconds: float


def block_generator(seed: int, block: int, device) -> torch.Generator:
    """The generator of block `block`'s samples: seeded by (seed, block index) through a 64-bit multiplicative hash
    (the golden-ratio constant), so neighbouring blocks and seeds get unrelated streams."""
    key = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.Generator(device=device).manual_seed(key)


def brierlm_score(briers: Sequence[float]) -> float:
    """100 * geometric mean of Brier-1..4. The estimates can be negative; like the official compute_metrics, the
    product is clamped at 0 before the fourth root (so any negative Brier-n gives 0, two negative ones do not)."""
    if len(briers) != MAX_NGRAM:
        raise ValueError(f"expected {MAX_NGRAM} values Brier-1..{MAX_NGRAM}, got {len(briers)}")
    return 100.0 * max(math.prod(briers), 0.0) ** (1 / MAX_NGRAM)


def min_block_tokens(model: CalmModel | TokenLlama) -> int:
    """The shortest block with one scored position."""
    if isinstance(model, TokenLlama):
        return MAX_NGRAM + 1
    k = model.config.chunk_size
    steps = rollout_steps(k)
    return k * (2 if steps == 1 else steps + 2)


def effective_block_size(model: CalmModel | TokenLlama, block_size: int) -> int:
    """block_size capped at the model's context (max_chunks chunks of K tokens); it must be a multiple of K."""
    k = model.config.chunk_size
    if block_size % k:
        raise ValueError(f"block size {block_size} is not a multiple of the model's chunk size K={k}")
    capped = min(block_size, model.config.max_chunks * k)
    if capped < min_block_tokens(model):
        raise ValueError(f"block size {capped} is below the {min_block_tokens(model)} tokens one scored position needs")
    return capped


def tokenize_documents(texts: Sequence[str], tokenizer, bos_token_id: int | None) -> list[list[int]]:
    """Each text's token ids after a bos id, as the official pipeline's Llama-3 tokenizer call adds it (no eos)."""
    prefix = [] if bos_token_id is None else [bos_token_id]
    return [prefix + tokenizer.encode(text) for text in texts]


def split_blocks(
    documents: Sequence[list[int]], block_size: int, per_document: bool, min_tokens: int, multiple: int
) -> tuple[list[list[int]], list[range]]:
    """Blocks of at most block_size tokens, and for each block the documents it holds tokens of.

    Official protocol (per_document False): the documents concatenated and cut into blocks of block_size, the
    remainder dropped. per_document: each document cut on its own; its last block, shortened to a multiple of K, is
    kept when it has min_tokens.
    """
    blocks, owners = [], []
    if not per_document:
        stream = [token for document in documents for token in document]
        ends = list(itertools.accumulate(len(d) for d in documents))
        starts = [end - len(d) for end, d in zip(ends, documents, strict=True)]
        for start in range(0, len(stream) - block_size + 1, block_size):
            stop = start + block_size
            blocks.append(stream[start:stop])
            owners.append(range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, stop)))
        return blocks, owners
    for index, document in enumerate(documents):
        for start in range(0, len(document), block_size):
            block = document[start : start + block_size]
            block = block[: len(block) - len(block) % multiple]
            if len(block) >= min_tokens:
                blocks.append(block)
                owners.append(range(index, index + 1))
    return blocks, owners


@torch.inference_mode()
def evaluate_brierlm(
    model: CalmModel | TokenLlama,
    texts: Sequence[str],
    config: BrierLMConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
    shard: Shard | None = None,
) -> BrierLMResult:
    """BrierLM of a model on documents: tokenize (bos + text), cut into blocks, score every block, and average each
    Brier-n over all scored positions (with the official equal-sized blocks that is the mean of the block means).

    shard: this process's part of a data-parallel run (distributed/group.py): it scores every world_size-th block,
    and every rank returns the whole result. progress is called on rank 0 only, with rank 0's blocks and documents.
    """
    config = config or BrierLMConfig()
    shard = shard or Shard()
    started = time.perf_counter()
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: load it with tokenizer=<dir> or put one in the checkpoint")
    block_size = effective_block_size(model, config.block_size)
    documents = tokenize_documents(texts, model.tokenizer, model.config.bos_token_id)
    k = model.config.chunk_size
    blocks, owners = split_blocks(documents, block_size, config.per_document, min_block_tokens(model), k)
    if not blocks:
        total = sum(len(d) for d in documents)
        raise ValueError(
            f"{len(documents)} documents ({total} tokens) make no block of {block_size} tokens; lower the block size"
        )
    # Each block's samples come from its own generator, seeded by (seed, block index): the value does not depend on
    # how blocks are batched or on which rank scores them (a data-parallel run equals a single-process one).
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))  # similar lengths share a batch: less padding
    mine = shard.take(order)
    pad = model.config.pad_token_id or 0
    blocks_left = Counter(d for i in mine for d in owners[i])  # per document, of this rank's blocks
    # Per-block sums, each filled by the one rank that scores the block, reduced, then added in block order: the
    # same additions in the same order at any number of ranks, so the value is the same to the last bit.
    block_sums = torch.zeros(len(blocks), MAX_NGRAM, dtype=torch.float64)
    block_positions = torch.zeros(len(blocks), dtype=torch.int64)
    blocks_done = documents_done = 0
    for first in range(0, len(mine), config.batch_size):
        indices = mine[first : first + config.batch_size]
        batch = [blocks[i] for i in indices]
        width = max(len(block) for block in batch)
        ids = torch.tensor([block + [pad] * (width - len(block)) for block in batch], device=model.device)
        lengths = torch.tensor([len(block) for block in batch], device=model.device)
        generators = [block_generator(config.seed, i, model.device) for i in indices]
        estimates, valid = brier_estimates(model, ids, lengths, generator=generators)
        block_sums[indices] = torch.where(valid[..., None], estimates.double(), 0.0).sum(1).cpu()
        block_positions[indices] = valid.sum(1).cpu()
        blocks_done += len(batch)
        for document in (d for i in indices for d in owners[i]):
            blocks_left[document] -= 1
            documents_done += blocks_left[document] == 0
        if progress is not None and shard.is_main:
            elapsed = time.perf_counter() - started
            positions = int(block_positions.sum())
            progress(Progress(blocks_done, len(mine), documents_done, len(blocks_left), positions, elapsed))
    shard.sum(block_sums)
    shard.sum(block_positions)
    sums = block_sums.sum(0)
    positions = int(block_positions.sum())
    briers = (sums / positions).tolist()
    return BrierLMResult(
        *briers,
        brierlm=brierlm_score(briers),
        positions=positions,
        documents=len(documents),
        tokens=sum(len(block) for block in blocks),
        blocks=len(blocks),
        block_size=block_size,
        requested_block_size=config.block_size,
        seconds=time.perf_counter() - started,
    )

"""BrierLM (shared CALM.md section 3): the likelihood-free language-model score of CALM models and token-level
Llamas over a text file, as the official evaluation computes it; `calm eval brierlm` is built from
`add_brierlm_arguments` and `run_brierlm`.

Brier(P, y) = 2 P(y) - sum_x P(x)^2 is estimated without likelihoods from two samples x1, x2 ~ P as
1{x1 = y} + 1{x2 = y} - 1{x1 = x2}; Brier-n treats the n tokens after a position as one outcome, and
BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from calm_engine.kernels.ae_decode import project_argmax_ref
from calm_engine.model.calm import CalmModel
from calm_engine.model.checkpoint import default_model_path, load
from calm_engine.model.llama import KVCache, LlamaBackbone, apply_rotary, rotary_cos_sin
from calm_engine.model.token_llama import TokenLlama

MAX_NGRAM = 4  # Brier-1..4
DEFAULT_BLOCK_SIZE = 8192  # the official evaluation's block_size (train_calm.py), in tokens
# Per-position work (branch attention scores, token-model logits) runs in slices of at most this many elements
# (64 MB in float32): a CALM-M block's branch scores would take 1 GB at once, a token model's logits 4 GB.
ELEMENTS_PER_SLICE = 1 << 24


@dataclass(frozen=True)
class BrierLMConfig:
    """How a text file is cut and scored.

    block_size: tokens per block, capped at the model's context; the official default is 8192.
    batch_size: blocks per forward pass.
    seed: seeds the generator of every sample.
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


def brierlm_score(briers: Sequence[float]) -> float:
    """100 * geometric mean of Brier-1..4. The estimates can be negative; like the official compute_metrics, the
    product is clamped at 0 before the fourth root (so any negative Brier-n gives 0, two negative ones do not)."""
    if len(briers) != MAX_NGRAM:
        raise ValueError(f"expected {MAX_NGRAM} values Brier-1..{MAX_NGRAM}, got {len(briers)}")
    return 100.0 * max(math.prod(briers), 0.0) ** (1 / MAX_NGRAM)


class BranchedContinuations:
    """Continuations that branch off positions start..stop-1 of every row of a teacher-forced block, extended
    together one input at a time.

    The j-th input of branch p sits at position p + j and attends to the block's keys at positions 0..p and to the
    branch's own earlier inputs: what running the row's first p + 1 positions plus the branch's inputs through the
    model computes, without copying the block's KV cache for each branch.
    """

    def __init__(self, backbone: LlamaBackbone, cache: KVCache, start: int, stop: int, max_steps: int):
        if not 0 <= start < stop <= cache.length:
            raise ValueError(f"branch positions {start}..{stop - 1} must lie in the cached 0..{cache.length - 1}")
        self.backbone = backbone
        self.start, self.stop, self.max_steps = start, stop, max_steps
        self.block_keys = [k[:, :, :stop] for k in cache.keys]
        self.block_values = [v[:, :, :stop] for v in cache.values]
        device = cache.keys[0].device
        # Branch p (row p - start) sees block positions 0..p.
        self.block_mask = torch.arange(stop, device=device) <= torch.arange(start, stop, device=device)[:, None]
        batch, kv_heads, _, head_dim = cache.keys[0].shape
        shape = (batch, kv_heads, stop - start, max_steps, head_dim)
        self.keys = [torch.zeros(shape, dtype=cache.keys[0].dtype, device=device) for _ in cache.keys]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.steps = 0

    def extend(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The next input of every branch [B, stop - start, hidden] -> its normed hidden state, same shape."""
        if self.steps == self.max_steps:
            raise ValueError(f"the branches were sized for {self.max_steps} steps")
        self.steps += 1
        config = self.backbone.config
        positions = torch.arange(self.start, self.stop, device=inputs_embeds.device)[None] + self.steps
        cos, sin = rotary_cos_sin(
            positions, config.head_dim, config.rope_theta, config.rope_scaling, inputs_embeds.dtype
        )
        x = inputs_embeds
        for index, layer in enumerate(self.backbone.layers):
            x = x + self._attention(index, layer.self_attn, layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.backbone.norm(x)

    def _attention(self, index, attn, x, cos, sin) -> torch.Tensor:
        batch, branches, _ = x.shape
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = attn.q_proj(x).view(batch, branches, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, branches, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, branches, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        step = self.steps
        self.keys[index][:, :, :, step - 1] = k
        self.values[index][:, :, :, step - 1] = v
        # Scores against the shared block keys and against each branch's own keys, one softmax over both.
        # Query heads are grouped by their key-value head: q [B, kv_heads, groups, branches, D].
        q = q.reshape(batch, kv_heads, heads // kv_heads, branches, head_dim).float() * head_dim**-0.5
        block_keys = self.block_keys[index][:, :, None].float()
        own_keys = self.keys[index][:, :, :, :step].float()
        block_scores = (q @ block_keys.transpose(-1, -2)).masked_fill(~self.block_mask, float("-inf"))
        own_scores = torch.einsum("bkgpd,bkpjd->bkgpj", q, own_keys)
        weights = torch.cat((block_scores, own_scores), dim=-1).softmax(dim=-1)
        block_weights, own_weights = weights.split((self.stop, step), dim=-1)
        out = block_weights @ self.block_values[index][:, :, None].float()
        out = out + torch.einsum("bkgpj,bkpjd->bkgpd", own_weights, self.values[index][:, :, :, :step].float())
        out = out.reshape(batch, heads, branches, head_dim).to(x.dtype)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, branches, heads * head_dim))


def _slice_length(batch: int, per_position: int) -> int:
    return max(1, ELEMENTS_PER_SLICE // max(1, batch * per_position))


def _check_lengths(ids: torch.Tensor, lengths: torch.Tensor | None, multiple: int) -> torch.Tensor:
    """Tokens per row of a right-padded batch [B, L]; None means every row is full."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be a 2-D tensor [blocks, tokens], got shape {list(ids.shape)}")
    if lengths is None:
        return torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
    lengths = torch.as_tensor(lengths, device=ids.device)
    if lengths.shape != (ids.shape[0],):
        raise ValueError(f"lengths must have shape [{ids.shape[0]}] (one per row of ids), got {list(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > ids.shape[1]).any()) or bool((lengths % multiple).any()):
        raise ValueError(
            f"lengths must be multiples of K={multiple} in [0, {ids.shape[1]}] (the padded length), "
            f"got {lengths.tolist()}"
        )
    return lengths


def _check_noise(noise: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(noise.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(noise.shape)}")


def _uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Head noise as the reference draws it: uniform on [-0.5, 0.5)."""
    return torch.rand(shape, generator=generator, device=device) - 0.5


def _sample_chunks(model: CalmModel, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Two head samples per position, decoded by argmax: hidden [B, P, h], noise [2, B, P, noise] -> [2, B, P, K].
    The vocabulary projection runs in blocks (project_argmax_ref): the logits of a block would not fit in memory."""
    latents = model.sample_latent(hidden.expand(2, *hidden.shape), noise)
    decoder = model.autoencoder.decoder
    states = decoder.hidden(latents.reshape(-1, 1, latents.shape[-1]))
    ids, _ = project_argmax_ref(states.reshape(-1, states.shape[-1]), decoder.lm_head_weight)
    return ids.view(*noise.shape[:3], model.config.patch_size)


def rollout_steps(patch_size: int) -> int:
    """Chunks a CALM model samples per start position to cover MAX_NGRAM tokens."""
    return math.ceil(MAX_NGRAM / patch_size)


def calm_start_positions(chunks: int, patch_size: int) -> int:
    """Scored start positions of a block of `chunks` chunks: every target chunk (all but the first) when K >= 4;
    with K < 4 the official slices predictions[:, i : -(steps - i)], which leaves the last full window unused."""
    targets = chunks - 1
    steps = rollout_steps(patch_size)
    return max(0, targets if steps == 1 else targets - steps)


@torch.inference_mode()
def calm_brier_estimates(
    model: CalmModel,
    ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    rollout_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Brier-1..4 estimates of a CALM model on right-padded blocks, as the official eval_brier.

    ids [B, n*K] token ids, lengths [B] tokens per row (multiples of K; None: all n*K). Chunk 0 is context only;
    hidden position t (after chunks 0..t, teacher-forced) predicts chunk t + 1. Two head samples per position are
    decoded by argmax and the estimate is 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} with each indicator a running product
    over the first 1..4 tokens. With K < 4 a start position t covers chunks t..t+s-1 (s = ceil(4/K)): the
    accuracy terms take the teacher-forced samples of those chunks (given x = y so far, the sample drawn after the
    true prefix is drawn after x's prefix), and the collision term rolls both samples forward from x1's chunks
    (x1's chunk is fed, two new samples drawn) for s - 1 steps.

    noise [2, B, n-1, noise_size] and rollout_noise [s-1, 2, B, P, noise_size] (P = calm_start_positions) replace
    the draws from `generator` (uniform on [-0.5, 0.5)). Returns (estimates [B, P, 4], valid [B, P]): padded
    positions are not valid.
    """
    k = model.config.patch_size
    lengths = _check_lengths(ids, lengths, k)
    batch, chunks = ids.shape[0], ids.shape[1] // k
    if chunks < 2:
        raise ValueError(f"a block needs at least 2 chunks ({2 * k} tokens), got {ids.shape[1]} tokens")
    targets_count, steps = chunks - 1, rollout_steps(k)
    positions = calm_start_positions(chunks, k)
    noise_size, device = model.config.noise_size, model.device
    if noise is None:
        noise = _uniform_noise((2, batch, targets_count, noise_size), generator, device)
    _check_noise(noise, (2, batch, targets_count, noise_size), "noise")
    cache = model.new_cache(batch, targets_count) if steps > 1 else None
    hidden = model.hidden_states(ids[:, :-k], cache)
    targets = ids[:, k:].view(batch, targets_count, k)

    heads = model.config.num_attention_heads
    width = _slice_length(batch, heads * targets_count)
    samples = torch.cat(
        [
            _sample_chunks(model, hidden[:, a : a + width], noise[:, :, a : a + width])
            for a in range(0, targets_count, width)
        ],
        dim=2,
    )
    row_targets = lengths // k - 1
    row_positions = row_targets if steps == 1 else row_targets - steps
    valid = torch.arange(positions, device=device) < row_positions[:, None]
    if steps == 1:
        first, second = samples[..., :MAX_NGRAM]
        hit_1 = (first == targets[..., :MAX_NGRAM]).float().cumprod(-1)
        hit_2 = (second == targets[..., :MAX_NGRAM]).float().cumprod(-1)
        collision = (first == second).float().cumprod(-1)
        return hit_1 + hit_2 - collision, valid

    def windows(chunked: torch.Tensor) -> torch.Tensor:  # [..., n-1, K] -> chunks t..t+s-1 of each start t
        return torch.cat([chunked[..., j : j + positions, :] for j in range(steps)], dim=-1)[..., :MAX_NGRAM]

    window_targets = windows(targets)
    hit_1 = (windows(samples[0]) == window_targets).float().cumprod(-1)
    hit_2 = (windows(samples[1]) == window_targets).float().cumprod(-1)
    if rollout_noise is None:
        rollout_noise = _uniform_noise((steps - 1, 2, batch, positions, noise_size), generator, device)
    _check_noise(rollout_noise, (steps - 1, 2, batch, positions, noise_size), "rollout_noise")
    same = torch.zeros(batch, positions, steps * k, dtype=torch.bool, device=device)
    for a in range(0, positions, width):
        b = min(positions, a + width)
        pair = samples[:, :, a:b]
        agree = (pair[0] == pair[1]).all(-1) & valid[:, a:b]
        same[:, a:b, :k] = pair[0] == pair[1]
        branches = BranchedContinuations(model.backbone, cache, a, b, steps - 1)
        for j in range(1, steps):
            if not bool(agree.any()):  # every pair differs: the collision term is 0 from here on, as in the reference
                break
            hidden_j = branches.extend(model.compress(pair[0].reshape(batch, -1)))
            pair = _sample_chunks(model, hidden_j, rollout_noise[j - 1, :, :, a:b])
            same[:, a:b, j * k : (j + 1) * k] = pair[0] == pair[1]
            agree &= (pair[0] == pair[1]).all(-1)
    collision = same[..., :MAX_NGRAM].float().cumprod(-1)
    return hit_1 + hit_2 - collision, valid


@torch.inference_mode()
def token_brier_estimates(
    model: TokenLlama,
    ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Brier-1..4 estimates of a token-level model on right-padded blocks, as the official train_ar.py.

    ids [B, L], lengths [B] (None: all L). Start position t (t = 0..L-5, so that all four target tokens exist)
    scores the n tokens y = ids[t+1 .. t+n]. The accuracy term is exact: 2 * P(y), the product of the
    teacher-forced probabilities p(y_{t+m} | ids[..t+m-1]). The collision term sum_x P(x)^2 over n-grams is
    estimated with lower variance than 1{x1 = x2}: two continuations are sampled at temperature 1 from the softmax,
    both rolled forward from x1's tokens, and the term for n is 1{x1 and x2 agree on their first n-1 tokens} times
    the exact sum_x p(x | x1's first n-1 tokens)^2. Its expectation is sum over prefixes of P(prefix)^2 times that
    sum, i.e. sum_x P(x)^2: the estimate 2 P(y) - collision is unbiased for Brier-n.

    The block runs once (teacher-forced, with its KV cache); the continuations of all start positions are then
    extended together (BranchedContinuations), three steps, stopping early once no sample pair still agrees.
    Returns (estimates [B, L-4, 4], valid [B, L-4]).
    """
    lengths = _check_lengths(ids, lengths, 1)
    batch, length = ids.shape
    if length < MAX_NGRAM + 1:
        raise ValueError(f"a block needs at least {MAX_NGRAM + 1} tokens, got {length}")
    hidden_positions, positions = length - 1, length - MAX_NGRAM
    device = model.device
    cache = model.new_cache(batch, hidden_positions)
    hidden = model.hidden_states(ids[:, :-1], cache)
    valid = torch.arange(positions, device=device) < (lengths - MAX_NGRAM)[:, None]
    golden = torch.empty(batch, hidden_positions, device=device)
    collision = torch.zeros(batch, positions, MAX_NGRAM, device=device)
    same = torch.zeros(batch, positions, MAX_NGRAM, dtype=torch.bool, device=device)
    per_position = max(model.config.vocab_size, model.config.num_attention_heads * hidden_positions)
    width = _slice_length(batch, per_position)

    def distribution(states: torch.Tensor) -> torch.Tensor:
        return model.logits(states).float().log_softmax(-1)

    def draw_pair(log_probs: torch.Tensor) -> torch.Tensor:  # [B, P, V] -> two draws [B, P, 2]
        draws = torch.multinomial(log_probs.exp().flatten(0, 1), 2, replacement=True, generator=generator)
        return draws.view(*log_probs.shape[:2], 2)

    for a in range(0, hidden_positions, width):
        b = min(hidden_positions, a + width)
        log_probs = distribution(hidden[:, a:b])
        golden[:, a:b] = log_probs.gather(-1, ids[:, a + 1 : b + 1, None])[..., 0].exp()
        b = min(b, positions)  # the last three hidden positions only feed the accuracy terms
        if b <= a:
            continue
        log_probs = log_probs[:, : b - a]
        collision[:, a:b, 0] = (2 * log_probs).exp().sum(-1)
        same[:, a:b, 0] = True
        draws = draw_pair(log_probs)
        agree = (draws[..., 0] == draws[..., 1]) & valid[:, a:b]
        branches = BranchedContinuations(model.backbone, cache, a, b, MAX_NGRAM - 1)
        for n in range(1, MAX_NGRAM):
            if not bool(agree.any()):  # every pair differs: the collision term is 0 from here on, as in the reference
                break
            same[:, a:b, n] = agree
            log_probs = distribution(branches.extend(model.backbone.embed_tokens(draws[..., 0])))
            collision[:, a:b, n] = (2 * log_probs).exp().sum(-1)
            if n < MAX_NGRAM - 1:
                draws = draw_pair(log_probs)
                agree &= draws[..., 0] == draws[..., 1]
    accuracy = torch.stack([golden[:, m : m + positions] for m in range(MAX_NGRAM)], dim=-1).cumprod(-1)
    return 2 * accuracy - same.float() * collision, valid


def brier_estimates(
    model: CalmModel | TokenLlama,
    ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """calm_brier_estimates or token_brier_estimates, by model type."""
    if isinstance(model, CalmModel):
        return calm_brier_estimates(model, ids, lengths, generator=generator)
    if isinstance(model, TokenLlama):
        return token_brier_estimates(model, ids, lengths, generator=generator)
    raise TypeError(f"BrierLM needs a CalmModel or a TokenLlama, got {type(model).__name__}")


def min_block_tokens(model: CalmModel | TokenLlama) -> int:
    """The shortest block with one scored position."""
    if isinstance(model, TokenLlama):
        return MAX_NGRAM + 1
    k = model.config.patch_size
    steps = rollout_steps(k)
    return k * (2 if steps == 1 else steps + 2)


def effective_block_size(model: CalmModel | TokenLlama, block_size: int) -> int:
    """block_size capped at the model's context (max_chunks chunks of K tokens); it must be a multiple of K."""
    k = model.config.patch_size
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
) -> BrierLMResult:
    """BrierLM of a model on documents: tokenize (bos + text), cut into blocks, score every block, and average each
    Brier-n over all scored positions (with the official equal-sized blocks that is the mean of the block means)."""
    config = config or BrierLMConfig()
    started = time.perf_counter()
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: load it with tokenizer=<dir> or put one in the checkpoint")
    block_size = effective_block_size(model, config.block_size)
    documents = tokenize_documents(texts, model.tokenizer, model.config.bos_token_id)
    k = model.config.patch_size
    blocks, owners = split_blocks(documents, block_size, config.per_document, min_block_tokens(model), k)
    if not blocks:
        total = sum(len(d) for d in documents)
        raise ValueError(
            f"{len(documents)} documents ({total} tokens) make no block of {block_size} tokens; lower the block size"
        )
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))  # similar lengths share a batch: less padding
    generator = torch.Generator(device=model.device).manual_seed(config.seed)
    pad = model.config.pad_token_id or 0
    blocks_left = Counter(d for documents_of_block in owners for d in documents_of_block)  # per document
    sums = torch.zeros(MAX_NGRAM, dtype=torch.float64)
    positions = blocks_done = documents_done = 0
    for first in range(0, len(order), config.batch_size):
        indices = order[first : first + config.batch_size]
        batch = [blocks[i] for i in indices]
        width = max(len(block) for block in batch)
        ids = torch.tensor([block + [pad] * (width - len(block)) for block in batch], device=model.device)
        lengths = torch.tensor([len(block) for block in batch], device=model.device)
        estimates, valid = brier_estimates(model, ids, lengths, generator=generator)
        sums += estimates[valid].double().sum(0).cpu()
        positions += int(valid.sum())
        blocks_done += len(batch)
        for document in (d for i in indices for d in owners[i]):
            blocks_left[document] -= 1
            documents_done += blocks_left[document] == 0
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress(Progress(blocks_done, len(blocks), documents_done, len(documents), positions, elapsed))
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


def read_texts(path: Path, max_documents: int | None = None) -> list[str]:
    """The "text" field of each line of a jsonl file (blank lines skipped)."""
    texts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if max_documents is not None and len(texts) == max_documents:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: line {number} is not a JSON object with a string field 'text'")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


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
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load(args.model_dir, dtype=args.dtype, device=device, tokenizer=args.tokenizer)
        result = evaluate_brierlm(model, texts, config, progress=ProgressLine())
    except (OSError, ValueError) as error:
        print(f"calm eval brierlm: error: {error}", file=sys.stderr)
        return 2
    print(format_result(result, str(args.data)))
    if args.output is not None:
        scored = args.model_dir if args.model_dir is not None else default_model_path()
        record = {"model": str(scored), "data": str(args.data), "seed": args.seed}
        args.output.write_text(json.dumps({**record, **dataclasses.asdict(result)}, indent=2) + "\n")
    return 0

"""Per-position Brier-n estimates (BrierLM's inner loop, see brierlm.py) of CALM models and token-level Llamas on
teacher-forced blocks: two samples per position, x1 and x2, scored against the text y as
1{x1 = y} + 1{x2 = y} - 1{x1 = x2} over the first 1..4 tokens after the position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from calm_engine.kernels.ae_decode import project_argmax_ref
from calm_engine.model.branches import BranchedContinuations
from calm_engine.model.calm import CalmModel
from calm_engine.model.token_llama import TokenLlama

MAX_NGRAM = 4  # Brier-1..4
# Per-position work (branch attention scores, token-model logits) runs in slices of at most this many elements
# (64 MB in float32): a CALM-M block's branch scores would take 1 GB at once, a token model's logits 4 GB.
ELEMENTS_PER_SLICE = 1 << 24


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


Generators = torch.Generator | Sequence[torch.Generator] | None


def _uniform_noise(
    shape: tuple[int, ...], generator: Generators, device, row_dim: int = 1, lengths: Sequence[int] | None = None
) -> torch.Tensor:
    """Head noise as the reference draws it: uniform on [-0.5, 0.5).

    generator: one generator for the whole tensor, or one per row (the tensor's dimension row_dim): each row's noise
    is then drawn from its own generator over its own length (lengths[b] along the row's dimension row_dim, the rest
    zero), so a block's draws do not depend on the blocks it is batched with (brierlm.py keys them by block).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=device) - 0.5
    noise = torch.zeros(shape, device=device)
    for b, row_generator in enumerate(generator):
        row = noise.select(row_dim, b)
        row_shape = list(row.shape)
        if lengths is not None:
            row_shape[row_dim] = lengths[b]
        row.narrow(row_dim, 0, row_shape[row_dim]).copy_(
            torch.rand(row_shape, generator=row_generator, device=device) - 0.5
        )
    return noise


def _sample_chunks(model: CalmModel, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Two head samples per position, decoded by argmax: hidden [B, P, h], noise [2, B, P, noise] -> [2, B, P, K].
    The vocabulary projection runs in blocks (project_argmax_ref): the logits of a block would not fit in memory."""
    latents = model.sample_latent(hidden.expand(2, *hidden.shape), noise)
    decoder = model.autoencoder.decoder
    states = decoder.hidden(latents.reshape(-1, 1, latents.shape[-1]))
    ids, _ = project_argmax_ref(states.reshape(-1, states.shape[-1]), decoder.lm_head_weight)
    return ids.view(*noise.shape[:3], model.config.chunk_size)


def rollout_steps(chunk_size: int) -> int:
    """Chunks a CALM model samples per start position to cover MAX_NGRAM tokens."""
    return math.ceil(MAX_NGRAM / chunk_size)


def calm_start_positions(chunks: int, chunk_size: int) -> int:
    """Scored start positions of a block of `chunks` chunks: every target chunk (all but the first) when K >= 4;
    with K < 4 the official slices predictions[:, i : -(steps - i)], which leaves the last full window unused."""
    targets = chunks - 1
    steps = rollout_steps(chunk_size)
    return max(0, targets if steps == 1 else targets - steps)


@torch.inference_mode()
def calm_brier_estimates(
    model: CalmModel,
    ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    generator: Generators = None,
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
    the draws from `generator` (uniform on [-0.5, 0.5); one generator, or one per row: see _uniform_noise).
    Returns (estimates [B, P, 4], valid [B, P]): padded positions are not valid.
    """
    k = model.config.chunk_size
    lengths = _check_lengths(ids, lengths, k)
    batch, chunks = ids.shape[0], ids.shape[1] // k
    if chunks < 2:
        raise ValueError(f"a block needs at least 2 chunks ({2 * k} tokens), got {ids.shape[1]} tokens")
    targets_count, steps = chunks - 1, rollout_steps(k)
    positions = calm_start_positions(chunks, k)
    noise_size, device = model.config.noise_size, model.device
    row_lengths = (lengths // k).tolist()
    if noise is None:
        row_targets_list = [max(0, n - 1) for n in row_lengths]
        noise = _uniform_noise((2, batch, targets_count, noise_size), generator, device, 1, row_targets_list)
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
        row_positions_list = [max(0, n - 1 - steps) for n in row_lengths]
        rollout_noise = _uniform_noise(
            (steps - 1, 2, batch, positions, noise_size), generator, device, 2, row_positions_list
        )
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
    generator: Generators = None,
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

    # Uniforms of every draw up front [3 draws, 2 samples, B, positions] (per row when generator is one per row):
    # a draw is the inverse of the distribution's CDF at its uniform, so slicing the positions changes nothing.
    row_positions = (lengths - MAX_NGRAM).clamp_min(0).tolist()
    uniforms = _uniform_noise((MAX_NGRAM - 1, 2, batch, positions), generator, device, 2, row_positions)

    def draw_pair(log_probs: torch.Tensor, n: int, a: int) -> torch.Tensor:  # [B, P, V] -> two draws [B, P, 2]
        cdf = log_probs.exp().cumsum(-1)
        u = (uniforms[n, :, :, a : a + log_probs.shape[1]] + 0.5).permute(1, 2, 0) * cdf[..., -1:]
        return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(log_probs.shape[-1] - 1)

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
        draws = draw_pair(log_probs, 0, a)
        agree = (draws[..., 0] == draws[..., 1]) & valid[:, a:b]
        branches = BranchedContinuations(model.backbone, cache, a, b, MAX_NGRAM - 1)
        for n in range(1, MAX_NGRAM):
            if not bool(agree.any()):  # every pair differs: the collision term is 0 from here on, as in the reference
                break
            same[:, a:b, n] = agree
            log_probs = distribution(branches.extend(model.backbone.embed_tokens(draws[..., 0])))
            collision[:, a:b, n] = (2 * log_probs).exp().sum(-1)
            if n < MAX_NGRAM - 1:
                draws = draw_pair(log_probs, n, a)
                agree &= draws[..., 0] == draws[..., 1]
    accuracy = torch.stack([golden[:, m : m + positions] for m in range(MAX_NGRAM)], dim=-1).cumprod(-1)
    return 2 * accuracy - same.float() * collision, valid


def brier_estimates(
    model: CalmModel | TokenLlama,
    ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """calm_brier_estimates or token_brier_estimates, by model type."""
    if isinstance(model, CalmModel):
        return calm_brier_estimates(model, ids, lengths, generator=generator)
    if isinstance(model, TokenLlama):
        return token_brier_estimates(model, ids, lengths, generator=generator)
    raise TypeError(f"BrierLM needs a CalmModel or a TokenLlama, got {type(model).__name__}")

"""Likelihood-free temperature sampling over pools of K-token patches, batched and free of host syncs.

A CALM model has no logits over the next chunk, only a sampler: head (noise) -> latent -> argmax patch. Temperature
T = 1/r < 1 is reached by looking for repeated patches among several draws (paper, section on temperature sampling):

- `approximate_choice`, the paper's Algorithm 2 (what the official code does for T = 1/n): draw a pool of N patches,
  count equal patches, keep those seen at least n times (else n-1, ...), pick one with weight C(count, n).
  Extension to any T in (0, 1]: with r = 1/T = n + a, the weight is the falling power c^(r) = Gamma(c+1) /
  Gamma(c+1-r), over patches seen at least floor(r) times; if none is, r drops by 1 (as the official cascade drops
  n), until r < 2 keeps every patch seen at least once. For integer r the falling power is r! C(c, r), so the choice
  is the official one. Why it is sound: c/N -> P(x) almost surely and c^(r) / N^r -> P(x)^r for every real r > 0,
  so the choice probability converges to P(x)^r / sum_y P(y)^r = P_T(x) as N grows (the official Theorem 3, for
  every T instead of T = 1/n); for integer r the estimator of P^r is exactly unbiased (E[c^(r)] = N^(r) P^r).
- `exact_choice`, the paper's Algorithm 1: stage 1 accepts a patch x* when n draws in a row equal it (on the first
  mismatch the attempt restarts and that draw is discarded, which leaves the distribution unchanged), stage 2
  (a > 0) is the Bernoulli factory for P(x*)^a: draw; equal to x* -> accept; else reject with probability a/i.
  The draws are the pool's samples in order; the state carries from one pool to the next. After the request's
  `exact_max_pools` pools without acceptance the engine falls back to `approximate_choice` on the last pool (the
  bound on attempts; counted in the engine's stats).

Patches are grouped by sorting (`pool_counts`), plain tensor work with no host synchronisation, so the whole step
can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from calm_engine import native


@dataclass
class SamplingBatch:
    """Device tensors describing how each row of a step samples ([B] unless noted).

    seeds, steps: the request's seed and its generated-chunk index (noise.counter turns them into Philox counters).
    valid [B, S]: which of the S pool samples a row uses (a T = 1 row uses sample 0 only).
    inv_floor, inv_frac: n and a of 1/T = n + a.
    pools: the exact sampler's bound per row; max_pools: its maximum over the batch (0: approximate sampling).
    """

    seeds: torch.Tensor
    steps: torch.Tensor
    valid: torch.Tensor
    inv_floor: torch.Tensor
    inv_frac: torch.Tensor
    pools: torch.Tensor
    max_pools: int


def pool_counts(patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """patches [B, S, K] ids, valid [B, S] -> counts [B, S]: copies of each valid sample's patch among the valid
    samples of its row (0 for invalid samples).

    Grouping by sorting: K stable argsorts order each row lexicographically (a K-token patch does not fit one int64
    key for large vocabularies), equal neighbours form groups, group sizes are scattered back. O(S log S) time and
    O(S) memory per row, where comparing all pairs would need S^2.
    """
    rows, samples, k = patches.shape
    keys = torch.where(valid[..., None], patches, -1)  # invalid samples group together and are zeroed below
    order = torch.arange(samples, device=patches.device).expand(rows, samples)
    for column in reversed(range(k)):
        order = order.gather(1, keys[..., column].gather(1, order).argsort(dim=1, stable=True))
    ordered = keys.gather(1, order[..., None].expand(rows, samples, k))
    starts = torch.ones(rows, samples, dtype=torch.bool, device=patches.device)
    starts[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    group = starts.cumsum(1) - 1
    sizes = torch.zeros(rows, samples, dtype=torch.long, device=patches.device).scatter_add_(
        1, group, torch.ones_like(group)
    )
    counts = torch.empty_like(group).scatter_(1, order, sizes.gather(1, group))
    return counts * valid


def sample_log_weights(
    counts: torch.Tensor, valid: torch.Tensor, inv_floor: torch.Tensor, inv_frac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2's weights per sample: counts [B, S] (pool_counts), n [B], a [B] -> (eligible [B, S] bools,
    log-weights [B, S] float64). An eligible sample of a patch seen c times weighs c^(r) / c, so the patch gets the
    falling power c^(r) in total, at the first level r = 1/T - j that has candidates."""
    c = counts.double()
    drop = (inv_floor - counts.max(-1).values).clamp_min(0)
    level = (inv_floor - drop).double() + inv_frac.double()  # r, or r - j at the first level with candidates
    eligible = valid & (counts >= level.floor().long()[:, None])
    safe_c = torch.where(eligible, c, level[:, None] + 1)  # keeps lgamma's argument positive where masked
    return eligible, torch.lgamma(safe_c + 1) - torch.lgamma(safe_c + 1 - level[:, None]) - safe_c.log()


def approximate_choice(
    patches: torch.Tensor, valid: torch.Tensor, inv_floor: torch.Tensor, inv_frac: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Algorithm 2, generalised: the chosen sample index [B] of each row.

    inv_floor [B] int (n = floor(1/T)), inv_frac [B] float (a = 1/T - n), uniforms [B, S] on [0, 1) for the draw.
    The pick is an exponential race (argmax of log-weight + Gumbel noise) over `sample_log_weights`, which needs
    no host sync.
    """
    eligible, log_weight = sample_log_weights(pool_counts(patches, valid), valid, inv_floor, inv_frac)
    gumbel = -torch.log(-torch.log(uniforms.double().clamp(1e-300, 1.0 - 1e-16)))
    score = torch.where(eligible, log_weight + gumbel, -torch.inf)
    return score.argmax(-1)


def candidate_weights(patches: torch.Tensor, valid: torch.Tensor, inverse_temperature: float):
    """One row's distinct patches with their counts and choice probabilities (tests and reports; syncs).

    patches [S, K], valid [S] -> list of (patch tuple, count, probability) for the candidates, in order of first
    appearance; the probabilities are the ones approximate_choice samples from.
    """
    counts = pool_counts(patches[None], valid[None])
    n = int(inverse_temperature + 1e-9)
    eligible, log_weight = sample_log_weights(
        counts, valid[None], torch.tensor([n]), torch.tensor([inverse_temperature - n], dtype=torch.float64)
    )
    per_sample = torch.softmax(log_weight.masked_fill(~eligible, -torch.inf), dim=-1)[0]
    seen, result = set(), []
    for j in range(patches.shape[0]):
        key = tuple(patches[j].tolist())
        if eligible[0, j] and key not in seen:
            seen.add(key)
            c = int(counts[0, j])
            result.append((key, c, float(per_sample[j]) * c))
    return result


@dataclass
class ExactState:
    """Per-row state of Algorithm 1 across draws: [B] tensors, plus the current candidate x* [B, K]."""

    done: torch.Tensor
    chosen: torch.Tensor
    target: torch.Tensor
    matches: torch.Tensor  # stage-1 draws equal to target so far
    in_stage2: torch.Tensor
    stage2_index: torch.Tensor  # i of the Bernoulli factory

    @classmethod
    def start(cls, rows: int, patch_size: int, device) -> ExactState:
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        patch = torch.zeros(rows, patch_size, dtype=torch.long, device=device)
        false = torch.zeros(rows, dtype=torch.bool, device=device)
        return cls(false, patch, patch.clone(), zeros, false.clone(), zeros.clone())


def exact_choice(
    state: ExactState,
    patches: torch.Tensor,
    valid: torch.Tensor,
    inv_floor: torch.Tensor,
    inv_frac: torch.Tensor,
    uniforms: torch.Tensor,
) -> ExactState:
    """Algorithm 1 over one pool: the C++ loop of csrc/exact_sampler.cpp on CPU when it is built (microseconds
    instead of ~15 tensor operations per draw), else `exact_choice_ref`; both give the same state."""
    if (
        not native.has("exact_choice")
        or patches.device.type != "cpu"
        or uniforms.dtype != torch.float32  # the C++ loop compares in float32, as the reference does for float32
    ):
        return exact_choice_ref(state, patches, valid, inv_floor, inv_frac, uniforms)
    fields = [getattr(state, f.name).clone().contiguous() for f in dataclasses.fields(state)]
    native.calm_cpu.exact_choice(
        patches.to(torch.int64).contiguous().numpy(),
        valid.contiguous().numpy(),
        inv_floor.to(torch.int64).contiguous().numpy(),
        inv_frac.to(torch.float32).contiguous().numpy(),
        uniforms.contiguous().numpy(),
        *(t.numpy() for t in fields),  # updated in place
    )
    return ExactState(*fields)


def exact_choice_ref(
    state: ExactState,
    patches: torch.Tensor,
    valid: torch.Tensor,
    inv_floor: torch.Tensor,
    inv_frac: torch.Tensor,
    uniforms: torch.Tensor,
) -> ExactState:
    """Run Algorithm 1 over one pool of draws (patches [B, S, K] in order); returns the updated state.

    Rows already done ignore the pool. uniforms [B, S] drive the stage-2 rejections. A loop over the S draws of
    element-wise tensor ops: no host sync, fixed work, capturable.
    """
    done, chosen, target = state.done, state.chosen, state.target
    matches, in_stage2, index = state.matches, state.in_stage2, state.stage2_index
    frac = inv_frac.to(uniforms.dtype)
    for j in range(patches.shape[1]):
        draw = patches[:, j]
        live = valid[:, j] & ~done
        same = (draw == target).all(-1)
        # Stage 2 (the Bernoulli factory), for rows that were in it before this draw.
        s2 = live & in_stage2
        hit = s2 & same
        reject = s2 & ~same & (uniforms[:, j] * index.to(frac.dtype) < frac)
        index = torch.where(s2 & ~same & ~reject, index + 1, index)
        # Stage 1: a first draw sets the candidate, equal draws count, a different draw restarts (discarded).
        s1 = live & ~in_stage2
        first = s1 & (matches == 0)
        target = torch.where(first[:, None], draw, target)
        matches = torch.where(first | (s1 & same), matches + 1, torch.where(s1 | reject, 0, matches))
        reached = s1 & (matches == inv_floor)
        accept = hit | (reached & (frac == 0))
        in_stage2 = (in_stage2 & ~reject & ~hit) | (reached & (frac > 0))
        index = torch.where(reached, 1, index)
        chosen = torch.where(accept[:, None], target, chosen)
        done = done | accept
    return ExactState(done, chosen, target, matches, in_stage2, index)

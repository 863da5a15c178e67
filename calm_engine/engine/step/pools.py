"""Temperature sampling in a step, for every CALM backend: rows -> SamplingBatch, and the choice among the pools of
head samples a backend draws (choose_from_pools). The backends differ only in how they draw a pool (TorchStep in
PyTorch operations, NativeStep in one C++ call); the choice itself is engine/sampler.py's, on the same uniforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from calm_engine.engine.noise import CHOICE_UNIFORMS, NoiseFn, counter
from calm_engine.engine.sampler import ExactState, SamplingBatch, approximate_choice, exact_choice
from calm_engine.engine.step.interface import StepResult, StepRow

# counters [B] -> the pool drawn with the head noise of those counters, chunks [B, S, K]
DrawPool = Callable[[torch.Tensor], torch.Tensor]


def row_pools(row: StepRow) -> int:
    """The row's exact-sampler bound (0: the approximate sampler)."""
    params = row.params
    return params.exact_max_pools if params.sampler == "exact" and params.temperature < 1 else 0


def sampling_batch(rows: Sequence[StepRow], device: torch.device, one_sample: bool = False) -> SamplingBatch:
    """The step's SamplingBatch: each row draws params.samples_per_step head samples (one where one_sample: the
    token-level baseline) and samples with its own temperature and sampler."""
    per_row_list = [1 if one_sample else r.params.samples_per_step for r in rows]
    samples = max(per_row_list)
    per_row = torch.tensor(per_row_list, device=device)
    exact = [0 if one_sample else row_pools(r) for r in rows]
    return SamplingBatch(
        seeds=torch.tensor([r.seed for r in rows], device=device),
        steps=torch.tensor([r.chunks_done for r in rows], device=device),
        valid=torch.arange(samples, device=device)[None] < per_row[:, None],
        inv_floor=torch.tensor([r.params.inverse_floor for r in rows], device=device),
        inv_frac=torch.tensor(
            [max(0.0, r.params.inverse_temperature - r.params.inverse_floor) for r in rows],
            device=device,
            dtype=torch.float64,
        ),
        pools=torch.tensor(exact, device=device),
        max_pools=max(exact),
    )


def choice_uniforms(noise: NoiseFn, seeds: torch.Tensor, counters: torch.Tensor, samples: int) -> torch.Tensor:
    """The sampler's uniforms on [0, 1) [B, S] for the pool drawn at `counters` (its own stream)."""
    return noise(seeds, counters + CHOICE_UNIFORMS, samples, 1)[..., 0] + 0.5


def choose_from_pools(
    batch: SamplingBatch, draw_pool: DrawPool, noise: NoiseFn, chunk_size: int, allow_sync: bool = False
) -> StepResult:
    """Every row's next chunk [B, K], sampled as its parameters say from the pools draw_pool gives, and the [B] flags
    of rows whose exact sampler hit its bound and fell back to Algorithm 2.

    allow_sync lets the exact sampler stop early when every row has accepted (one host sync per pool; eager CPU
    only). Without it every pool up to the batch's bound runs, so the step has a fixed shape for CUDA graphs.
    """
    base = counter(batch.steps)
    rows_count, samples = batch.valid.shape
    device = batch.valid.device
    pool = draw_pool(base)
    no_fallback = torch.zeros(rows_count, dtype=torch.bool, device=device)
    if samples == 1:
        return StepResult(pool[:, 0], no_fallback)
    uniforms = choice_uniforms(noise, batch.seeds, base, samples)
    rows = torch.arange(rows_count, device=device)
    if batch.max_pools == 0:
        index = approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)
        return StepResult(pool[rows, index], no_fallback)
    fallback = pool[rows, approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)]
    state = ExactState.start(rows_count, chunk_size, device)
    for p in range(batch.max_pools):
        if p:
            counters = counter(batch.steps, pool=p)
            pool = draw_pool(counters)
            uniforms = choice_uniforms(noise, batch.seeds, counters, samples)
        live = batch.valid & (p < batch.pools)[:, None]
        state = exact_choice(state, pool, live, batch.inv_floor, batch.inv_frac, uniforms)
        if allow_sync and bool(state.done.all()):
            break
    # Rows that did not accept within their own bound take Algorithm 2's choice from their first pool.
    fell_back = ~state.done & (batch.pools > 0)
    return StepResult(torch.where(state.done[:, None], state.chosen, fallback), fell_back)

"""TorchStep: a CALM model's step in PyTorch operations (any device), with the Triton kernels as an ops option.

prefill / decode (the StepBackend interface) turn rows into tensors, run the backbone over the cache slots
(backbone.py), then `sample`: noise -> energy head over a pool of S samples per row -> autoencoder decode with the
vocabulary argmax in blocks -> the likelihood-free choice of sampler.py, all on the device. The graph step
(graph_step.py) replays the same `decode_hidden` + `sample` from static buffers. Every method is tested against the
reference model (tests/engine/test_torch_step.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import CHOICE_UNIFORMS, NoiseFn, counter
from calm_engine.engine.sampler import ExactState, SamplingBatch, approximate_choice, exact_choice
from calm_engine.engine.step.backbone import SlotBackbone
from calm_engine.engine.step.interface import Phase, StepBackend, StepResult, StepRow
from calm_engine.engine.step.ops import TorchOps
from calm_engine.engine.weights import ModelWeights


class TorchStep(StepBackend):
    """The reference backend: runs every step, on CPU or GPU; `ops` picks PyTorch or the Triton kernels."""

    name = "torch"

    def __init__(
        self, weights: ModelWeights, cache: SlotKVCache, ops: TorchOps, noise: NoiseFn,
        rope: tuple[torch.Tensor, torch.Tensor],
    ):  # fmt: skip
        self.weights, self.cache, self.ops, self.noise = weights, cache, ops, noise
        self.chunk_size = weights.shapes.chunk_size
        self.device = weights.device
        # Host syncs cost nothing on a CPU: there the exact sampler stops as soon as every row has accepted.
        self.allow_sync = self.device.type == "cpu"
        self.rope = rope  # the rotary table cos, sin [capacity, head_dim]: the C++ step reads the same one
        self.backbone = SlotBackbone(weights, cache, ops, rope)

    # ---- the StepBackend interface ----------------------------------------------------------------------------

    def supports(self, phase: Phase, rows: Sequence[StepRow]) -> bool:
        return True

    def prefill(self, rows: Sequence[StepRow]) -> StepResult:
        longest = max(len(r.fed_prompt) for r in rows)
        # Any id pads a shorter prompt: causal attention keeps its real positions blind to what follows them.
        ids = torch.tensor([r.fed_prompt + [0] * (longest - len(r.fed_prompt)) for r in rows], device=self.device)
        lengths = torch.tensor([r.prompt_chunks for r in rows], device=self.device)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        hidden = self.prefill_hidden(ids, lengths, slots)
        return self.sample(hidden, self.sampling_batch(rows), self.allow_sync)

    def decode(self, rows: Sequence[StepRow]) -> StepResult:
        device = self.device
        ids = torch.tensor([r.last_chunk for r in rows], device=device)
        position_list, slot_list = [r.next_position for r in rows], [r.slot for r in rows]
        positions, slots = torch.tensor(position_list, device=device), torch.tensor(slot_list, device=device)
        # Rows in consecutive slots (the engine sorts them by slot) let attention read the cache as a view.
        consecutive = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
        hidden = self.decode_hidden(
            ids, positions, slots, attend=max(position_list) + 1, first_slot=slot_list[0] if consecutive else None
        )
        return self.sample(hidden, self.sampling_batch(rows), self.allow_sync)

    # ---- rows -> tensors --------------------------------------------------------------------------------------

    def decode_inputs(self, rows: Sequence[StepRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, K], positions [B], slots [B] of a decode step."""
        device = self.device
        ids = torch.tensor([r.last_chunk for r in rows], device=device)
        positions = torch.tensor([r.next_position for r in rows], device=device)
        return ids, positions, torch.tensor([r.slot for r in rows], device=device)

    def sampling_batch(self, rows: Sequence[StepRow]) -> SamplingBatch:
        device = self.device
        per_row_list = [self.row_samples(r) for r in rows]
        samples = max(per_row_list)
        per_row = torch.tensor(per_row_list, device=device)
        valid = torch.arange(samples, device=device)[None] < per_row[:, None]
        exact = [self.row_pools(r) for r in rows]
        return SamplingBatch(
            seeds=torch.tensor([r.seed for r in rows], device=device),
            steps=torch.tensor([r.chunks_done for r in rows], device=device),
            valid=valid,
            inv_floor=torch.tensor([r.params.inverse_floor for r in rows], device=device),
            inv_frac=torch.tensor(
                [max(0.0, r.params.inverse_temperature - r.params.inverse_floor) for r in rows],
                device=device,
                dtype=torch.float64,
            ),
            pools=torch.tensor(exact, device=device),
            max_pools=max(exact),
        )

    def row_samples(self, row: StepRow) -> int:
        """Head samples the row draws this step."""
        return row.params.samples_per_step

    def row_pools(self, row: StepRow) -> int:
        """The row's exact-sampler bound (0: the approximate sampler)."""
        params = row.params
        return params.exact_max_pools if params.sampler == "exact" and params.temperature < 1 else 0

    # ---- tensors -> hidden states -> chunks -------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T*K] -> backbone inputs [B, T, hidden]: each chunk's K embeddings concatenated and compressed."""
        batch, k = ids.shape[0], self.chunk_size
        flat = self.ops.compress(self.weights.compression, self.weights.backbone.embed, ids.reshape(-1, k))
        return flat.view(batch, ids.shape[1] // k, -1)

    def prefill_hidden(self, ids: torch.Tensor, chunk_lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts ids [B, T*K] with chunk_lengths [B] into cache slots [B] -> last real hidden [B, H]."""
        return self.backbone.prefill(self.embed(ids), chunk_lengths, slots)

    def decode_hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: int,
        first_slot: int | None = None,
    ) -> torch.Tensor:
        """One chunk per row: ids [B, K] at chunk positions [B] into slots [B] -> hidden [B, H] (backbone.decode)."""
        return self.backbone.decode(self.embed(ids)[:, 0], positions, slots, attend, first_slot)

    def sample_pool(self, hidden: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, samples: int):
        """S head samples per row decoded to chunks [B, S, K], with the noise of (seed, counter)."""
        latents = self.ops.head(self.weights.head, hidden, seeds, counters, samples, self.noise)
        chunks = self.ops.decode_argmax(self.weights.decoder, latents.reshape(-1, latents.shape[-1]))
        return chunks.view(hidden.shape[0], samples, -1)

    def choice_uniforms(self, seeds: torch.Tensor, counters: torch.Tensor, samples: int) -> torch.Tensor:
        """The sampler's uniforms on [0, 1) [B, S] for the pool drawn at `counters` (its own stream)."""
        return self.noise(seeds, counters + CHOICE_UNIFORMS, samples, 1)[..., 0] + 0.5

    def sample(self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False) -> StepResult:
        """hidden [B, H] -> every row's next chunk [B, K], sampled as its parameters say, and the [B] flags of rows
        whose exact sampler hit its bound and fell back to Algorithm 2.

        allow_sync lets the exact sampler stop early when every row has accepted (one host sync per pool; eager CPU
        only). Without it every pool up to the batch's bound runs, so the step has a fixed shape for CUDA graphs.
        """
        base = counter(batch.steps)
        samples = batch.valid.shape[1]
        pool = self.sample_pool(hidden, batch.seeds, base, samples)
        no_fallback = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        if samples == 1:
            return StepResult(pool[:, 0], no_fallback)
        uniforms = self.choice_uniforms(batch.seeds, base, samples)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if batch.max_pools == 0:
            index = approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)
            return StepResult(pool[rows, index], no_fallback)
        fallback = pool[rows, approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)]
        state = ExactState.start(hidden.shape[0], self.chunk_size, hidden.device)
        for p in range(batch.max_pools):
            if p:
                counters = counter(batch.steps, pool=p)
                pool = self.sample_pool(hidden, batch.seeds, counters, samples)
                uniforms = self.choice_uniforms(batch.seeds, counters, samples)
            live = batch.valid & (p < batch.pools)[:, None]
            state = exact_choice(state, pool, live, batch.inv_floor, batch.inv_frac, uniforms)
            if allow_sync and bool(state.done.all()):
                break
        # Rows that did not accept within their own bound take Algorithm 2's choice from their first pool.
        fell_back = ~state.done & (batch.pools > 0)
        return StepResult(torch.where(state.done[:, None], state.chosen, fallback), fell_back)

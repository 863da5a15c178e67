"""TorchStep: a CALM model's step in PyTorch operations (any device), with the Triton kernels as an ops option.

prefill / decode (the StepBackend interface) turn rows into tensors, run the backbone over the cache slots
(backbone.py), then `sample`: noise -> energy head over a pool of S samples per row -> autoencoder decode with the
vocabulary argmax in blocks -> the likelihood-free choice of sampler.py (pools.py), all on the device. The graph step
(graph_step.py) replays the same `decode_hidden` + `sample` from static buffers. Every method is tested against the
reference model (tests/engine/test_torch_step.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import NoiseFn
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step.backbone import SlotBackbone
from calm_engine.engine.step.interface import Phase, StepBackend, StepResult, StepRow
from calm_engine.engine.step.ops import TorchOps
from calm_engine.engine.step.pools import choose_from_pools, sampling_batch
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
        return sampling_batch(rows, self.device)

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

    def sample(self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False) -> StepResult:
        """hidden [B, H] -> every row's next chunk [B, K], sampled as its parameters say, and the [B] flags of rows
        whose exact sampler hit its bound and fell back to Algorithm 2 (pools.choose_from_pools)."""
        samples = batch.valid.shape[1]

        def draw_pool(counters: torch.Tensor) -> torch.Tensor:
            return self.sample_pool(hidden, batch.seeds, counters, samples)

        return choose_from_pools(batch, draw_pool, self.noise, self.chunk_size, allow_sync)

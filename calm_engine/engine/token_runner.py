"""TokenModelRunner: the engine's forward passes and sampling step for the token-level baseline (TokenLlama, K = 1).

The backbone (packing, rotary table, prefill, decode) is ModelRunner's, shared through BackboneRunner; only the
input (an embedding lookup instead of chunk compression) and the sampling (logits instead of head + autoencoder)
differ. Sampling at temperature T in (0, 1] is the Gumbel-max race: argmax_v(logits_v / T + G_v) with
G_v = -log(-log U_v) is distributed as softmax(logits / T). The uniforms U are the engine's Philox noise keyed by
(request seed, step * COUNTERS_PER_STEP), so a seed reproduces its output whatever the batch, and the step has no
host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.model_runner import (
    COUNTERS_PER_STEP,
    BackboneRunner,
    NoiseFn,
    SamplingBatch,
    _argmax_rows,
    philox_noise,
)
from calm_engine.model.token_llama import TokenLlama


def gumbel_scores(logits: torch.Tensor, inverse_temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, V] / T + Gumbel noise from uniforms [B, V] on [0, 1); the argmax of each row is a sample.

    Computed in at least float32 (half-precision scores would round the noise into ties). -log U is clamped away
    from 0: a uniform that rounds to 1 must not give an infinite score. U = 0 gives a score of -inf, never chosen.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_exponential = torch.log(uniforms.to(dtype)).neg_().clamp_min_(torch.finfo(dtype).tiny).log_()  # in place
    return (logits.to(dtype) * inverse_temperature.to(dtype)[:, None]).sub_(log_exponential)


class TokenModelRunner(BackboneRunner):
    """The interface LLMEngine and DecodeGraphRunner use on ModelRunner, for a TokenLlama: patches are 1 token.

    A row's SamplingBatch fields other than seeds, steps and the temperature (inv_floor + inv_frac = 1/T) are
    ignored: a token model draws one sample per step, so num_samples and the sampler choice do not apply.
    """

    def __init__(
        self, model: TokenLlama, cache: SlotKVCache, noise: NoiseFn = philox_noise, use_kernels: bool | None = None
    ):
        super().__init__(model, cache, noise, use_kernels)
        self.lm_head_weight = model.lm_head.weight

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> backbone inputs [B, T, hidden]: the token embeddings."""
        return F.embedding(ids, self.model.backbone.embed_tokens.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, V]."""
        return F.linear(hidden, self.lm_head_weight)

    def sample_patches(
        self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, H] -> the next token [B, 1] of every row, sampled at its temperature, and [B] False (no
        sampler here falls back). allow_sync is accepted for the interface; nothing here syncs."""
        uniforms = self.noise(batch.seeds, batch.steps * COUNTERS_PER_STEP, 1, self.config.vocab_size)[:, 0] + 0.5
        scores = gumbel_scores(self.logits(hidden), batch.inv_floor + batch.inv_frac, uniforms)
        ids = _argmax_rows(scores)
        return ids[:, None], torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)

"""TokenStep: the token-level baseline's step (TokenLlama, K = 1), TorchStep's variant.

The backbone is the same (backbone.py); only the input (an embedding lookup instead of chunk compression) and the
sampling (logits instead of head + autoencoder) differ. Sampling at temperature T in (0, 1] is the Gumbel-max race:
argmax_v(logits_v / T + G_v) with G_v = -log(-log U_v) is distributed as softmax(logits / T). The uniforms U are
the engine's Philox noise of (request seed, noise.counter(step)), so a seed reproduces its output whatever the
batch, and the step has no host sync (CUDA-graph capturable). A row's num_samples, sampler and exact_max_pools do not
apply: a token model draws one sample per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from calm_engine.engine.noise import counter
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.engine.step.interface import StepResult, StepRow
from calm_engine.engine.step.pools import sampling_batch
from calm_engine.engine.step.torch_step import TorchStep
from calm_engine.kernels.reference import first_argmax


def gumbel_scores(logits: torch.Tensor, inverse_temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, V] / T + Gumbel noise from uniforms [B, V] on [0, 1); the argmax of each row is a sample.

    Computed in at least float32 (half-precision scores would round the noise into ties). -log U is clamped away
    from 0: a uniform that rounds to 1 must not give an infinite score. U = 0 gives a score of -inf, never chosen.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_exponential = torch.log(uniforms.to(dtype)).neg_().clamp_min_(torch.finfo(dtype).tiny).log_()  # in place
    return (logits.to(dtype) * inverse_temperature.to(dtype)[:, None]).sub_(log_exponential)


class TokenStep(TorchStep):
    def sampling_batch(self, rows: Sequence[StepRow]) -> SamplingBatch:
        return sampling_batch(rows, self.device, one_sample=True)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> backbone inputs [B, T, hidden]: the token embeddings."""
        return F.embedding(ids, self.weights.backbone.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, V]."""
        return F.linear(hidden, self.weights.lm_head.weight)

    def sample(self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False) -> StepResult:
        """hidden [B, H] -> the next token [B, 1] of every row, sampled at its temperature; no row falls back.
        allow_sync is accepted for the interface; nothing here syncs."""
        uniforms = self.noise(batch.seeds, counter(batch.steps), 1, self.weights.shapes.vocab)[:, 0] + 0.5
        ids = first_argmax(gumbel_scores(self.logits(hidden), batch.inv_floor + batch.inv_frac, uniforms))
        return StepResult(ids[:, None], torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device))

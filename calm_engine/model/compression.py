"""Input compression (`embed_proj` in the official code): the K token embeddings of a chunk -> one backbone input."""

from __future__ import annotations

from torch import nn

from calm_engine.model.config import CalmConfig
from calm_engine.model.layers import LAYER_NORM_EPS


class InputCompression(nn.Sequential):
    """[..., K*hidden] -> Linear(K*h, 2h) -> SiLU -> Linear(2h, h) -> LayerNorm -> [..., hidden].

    A Sequential so that its state dict keys are the official ones (`embed_proj.0`, `embed_proj.2`, `embed_proj.3`).
    """

    def __init__(self, config: CalmConfig):
        hidden = config.hidden_size
        super().__init__(
            nn.Linear(config.chunk_size * hidden, 2 * hidden),
            nn.SiLU(),
            nn.Linear(2 * hidden, hidden),
            nn.LayerNorm(hidden, eps=LAYER_NORM_EPS),
        )

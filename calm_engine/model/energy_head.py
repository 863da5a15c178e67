"""The energy-based generative head: (backbone hidden state, uniform noise) -> one latent vector, in one pass.

Plain PyTorch, the reference for the fused head kernel. Names follow the official `MLPGenerator` state dict.
The noise is explicit: the reference draws it as `torch.rand(...) - 0.5`, uniform on [-0.5, 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_engine.model.config import CalmConfig
from calm_engine.model.layers import LAYER_NORM_EPS


class MLPBlock(nn.Module):
    """Residual gated block refining the noise embedding x, conditioned on the hidden-state embedding c."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(
            nn.Linear(2 * channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, 2 * channels),
        )
        self.down_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gate, up = self.linears(torch.cat((self.in_ln(x), condition), dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, latent_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, latent_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(nn.Module):
    def __init__(self, config: CalmConfig):
        super().__init__()
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, config.hidden_size)
        self.hidden_embd = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm_hidden = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm_noise = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp_blocks = nn.ModuleList(MLPBlock(config.hidden_size) for _ in range(config.num_mlp_layers))
        self.final_layer = FinalLayer(config.hidden_size, config.latent_size)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size], noise [..., noise_size] (same leading shape) -> latent [..., latent_size]."""
        x = self.norm_noise(self.noise_embd(noise))
        condition = self.norm_hidden(self.hidden_embd(hidden))
        for block in self.mlp_blocks:
            x = block(x, condition)
        return self.final_layer(x)

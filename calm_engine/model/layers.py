"""Building blocks shared by the backbone and the autoencoder: RMSNorm and the gated (SwiGLU) MLP."""

from __future__ import annotations

import torch
from torch import nn

from calm_engine.kernels.reference import ACTIVATIONS
from calm_engine.kernels.rms_norm import rms_norm_ref

# LayerNorm epsilon of the generative head and the input compression: fixed in the official code, not in config.
LAYER_NORM_EPS = 1e-6

# The activations a config may name (hidden_act), by name.
ACTIVATION_FUNCTIONS = ACTIVATIONS


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (the order matters in half precision)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """Llama MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

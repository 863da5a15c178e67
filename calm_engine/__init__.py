"""calm-engine: an inference engine for Continuous Autoregressive Language Models (CALM).

Entry point: `model = calm_engine.load("path/to/calm_checkpoint")`; see the README for the model API.
"""

from calm_engine.model.checkpoint import load, load_autoencoder

__all__ = ["load", "load_autoencoder"]

"""calm-engine: an inference engine for Continuous Autoregressive Language Models (CALM).

Entry point: `model = calm_engine.load("path/to/calm_checkpoint")`; see the README for the model API.
"""

from calm_engine.engine.config import EngineConfig
from calm_engine.engine.llm_engine import LLM, LLMEngine
from calm_engine.model.checkpoint import load, load_autoencoder
from calm_engine.sampling_params import SamplingParams

# The one place the version is written: setup.py reads it from this line.
__version__ = "0.1.0"

__all__ = ["LLM", "EngineConfig", "LLMEngine", "SamplingParams", "__version__", "load", "load_autoencoder"]

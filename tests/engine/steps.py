"""Test helpers: the step backends of a model and a cache, built as the engine builds them (step/policy.py)."""

from __future__ import annotations

from calm_engine.engine.config import EngineConfig
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.step.native_step import NativeStep
from calm_engine.engine.step.policy import build_backends
from calm_engine.engine.step.torch_step import TorchStep
from calm_engine.engine.weights import ModelWeights


def torch_step(model, cache: SlotKVCache, use_kernels: bool = False, **options) -> TorchStep:
    """The PyTorch step (a TokenStep for a token-level model), with the Triton kernels if use_kernels."""
    config = EngineConfig(use_kernels=use_kernels, use_cpu_step=False, use_cuda_graph=False, **options)
    return build_backends(ModelWeights.of(model), cache, config).torch


def native_step(step: TorchStep, **options) -> NativeStep:
    """The C++ step over the same weights, cache and rotary table as `step` (options: isa, screen_vocab)."""
    return NativeStep(step.weights, step.cache, step.rope, step.noise, **options)

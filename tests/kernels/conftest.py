"""Kernel tests run on CPU under the triton interpreter; it must be switched on before any kernel is defined.

Interpreter limits that shape these tests: bf16/fp16 arithmetic and dots are wrong there (so half-precision rows
run on CUDA only), out-of-bounds loads do not fault (so outputs are poisoned with NaN before every call).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (Linux only)")
cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16/fp16 are wrong in the triton interpreter: checked on a GPU only"
)

# (dtype, relative tolerance) rows; relative to the largest reference magnitude (tests/conftest.py max_rel_error).
FP32 = pytest.param(torch.float32, 2e-5, id="fp32")
BF16 = pytest.param(torch.bfloat16, 4e-2, id="bf16", marks=cuda_only)
FP16 = pytest.param(torch.float16, 1e-2, id="fp16", marks=cuda_only)
DTYPES = [FP32, BF16, FP16]


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    """An output buffer full of NaN (or -1 for integers): any element a kernel fails to write fails the test."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return torch.full(shape, -1, dtype=dtype, device=DEVICE)


def pytest_collection_modifyitems(config, items):
    # The interpreter itself trips a numpy DeprecationWarning on every scalar index: noise, not our code.
    for item in items:
        if "tests/kernels/" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"))

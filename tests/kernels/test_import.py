"""`kernels` imports without triton (references work, kernels name the fix) and refuses CPU without the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

HIDE_TRITON = """
import sys
sys.modules["triton"] = None  # an import of triton now raises ImportError, as on a machine without it
import torch
import calm_engine.kernels as kernels
assert not kernels.triton_available()
from calm_engine.kernels.energy_head import energy_head, energy_head_ref
from calm_engine.kernels.philox import uniform_noise, uniform_noise_ref
from calm_engine.kernels import ae_decode, ae_encode, decode_attention, rms_norm, swiglu
assert uniform_noise_ref(torch.tensor([1]), torch.tensor([0]), 2, 3).shape == (1, 2, 3)
try:
    uniform_noise(torch.tensor([1]), torch.tensor([0]), 2, 3)
except RuntimeError as error:
    print("ERROR:", error)
"""

NO_INTERPRETER = """
import torch
from calm_engine.kernels.philox import uniform_noise
try:
    uniform_noise(torch.tensor([1]), torch.tensor([0]), 2, 3)
except ValueError as error:
    print("ERROR:", error)
"""


def _run(code: str, **env) -> str:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    environment.pop("TRITON_INTERPRET", None)
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_imports_and_references_without_triton():
    output = _run(HIDE_TRITON)
    assert "ERROR:" in output and "needs triton" in output and "_ref" in output


def test_cpu_tensors_need_the_interpreter():
    import torch

    if torch.cuda.is_available():
        return  # the check is for CPU tensors without TRITON_INTERPRET; on a GPU machine CPU tensors still fail
    output = _run(NO_INTERPRETER, CUDA_VISIBLE_DEVICES="")
    assert "ERROR:" in output and "TRITON_INTERPRET=1" in output

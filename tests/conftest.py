"""Shared test helpers: where ../shared lives (missing files fail, never skip) and a relative-error check."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter where no GPU is present. The switch is read when a kernel is defined,
# so it is set here, before any test module imports the kernels (the engine imports them too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CALM_SHARED_DIR", REPO_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; its absence is a test failure (CI must have it), not a skip."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"required shared file missing: {path} (tests read ../shared beside the repository)")
    return path


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; NaN anywhere gives inf."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    error = max_rel_error(actual, expected)
    if os.environ.get("CALM_PRINT_ERRORS"):  # for reports: pytest -s -v prints each check's error
        print(f"  {name}: max relative error {error:.2e}")
    assert error <= rel, f"{name}: max relative error {error:.3g} > {rel:.1g}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws its own random inputs, reproducibly per test name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

"""rms_norm against the model's RMSNorm, swiglu against SiLU(gate) * up."""

from __future__ import annotations

import pytest
import torch
from calm_engine.kernels.rms_norm import rms_norm, rms_norm_ref
from calm_engine.kernels.swiglu import swiglu, swiglu_ref

from calm_engine.model.layers import RMSNorm
from tests.conftest import assert_rel_close
from tests.kernels.cases import RMS_NORM_SHAPES, SWIGLU_SHAPES
from tests.kernels.conftest import DEVICE, DTYPES, needs_triton, poisoned

pytestmark = needs_triton


@pytest.mark.parametrize("shape", RMS_NORM_SHAPES)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_rms_norm(shape, dtype, rel):
    module = RMSNorm(shape[-1], 1e-5).to(DEVICE, dtype)
    module.weight.data.normal_(1.0, 0.1)
    x = (torch.randn(shape) * 3).to(DEVICE, dtype)
    out = rms_norm(x, module.weight, 1e-5, out=poisoned(*shape, dtype=dtype))
    assert_rel_close(out, module(x), rel / 4, "rms_norm")
    assert_rel_close(rms_norm_ref(x, module.weight, 1e-5), module(x), 0.0, "reference")


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_swiglu(shape, dtype, rel):
    gate, up = (torch.randn(shape) * 2).to(DEVICE, dtype), torch.randn(shape).to(DEVICE, dtype)
    out = swiglu(gate, up, out=poisoned(*shape, dtype=dtype))
    assert_rel_close(out, swiglu_ref(gate, up), rel / 4, "swiglu")


def test_validation():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 5), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 5), torch.randn(2, 4))

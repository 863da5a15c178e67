"""Fused Triton kernels for the CALM decode path, each beside its plain-PyTorch reference (`<op>` and `<op>_ref`).

Importing this package loads nothing heavy; each `kernels.<op>` module imports triton if installed and otherwise
still offers its reference, with the kernel raising a clear error when called.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when triton is importable and can run here: a CUDA device, or TRITON_INTERPRET=1 (CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    import torch

    return torch.cuda.is_available()

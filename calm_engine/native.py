"""The optional C++ extension (csrc/, built by setup.py as calm_engine._calm_cpu): imported here and nowhere else.

`calm_cpu` is the extension module, or None where it was not built (no compiler at install time); every user reads it
as `native.calm_cpu` when it runs, so switching it off in one place (a test's monkeypatch) switches it off everywhere:
the Philox noise, the exact sampler's loop and the C++ step then fall back to tensor operations.
"""

from __future__ import annotations

import torch  # noqa: F401 - first: torch and the extension both ship libgomp, and torch's must load first

try:
    from calm_engine import _calm_cpu as calm_cpu
except ImportError:
    calm_cpu = None


def has(name: str) -> bool:
    """Whether the built extension provides `name` (an older build may lack a newer function)."""
    return calm_cpu is not None and hasattr(calm_cpu, name)

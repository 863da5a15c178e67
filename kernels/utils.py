"""Shared helpers for the kernels: the optional triton import, launch checks, block sizes."""

from __future__ import annotations

import os

import torch

try:  # triton is optional: without it every reference still works and every kernel raises a clear error
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test with triton hidden
    triton = None
    tl = None

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _UnavailableKernel:
    """Stands in for a @triton.jit function when triton is not installed; launching it names the fix."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        raise RuntimeError(
            f"kernel {self.__name__} needs triton (pip install triton==3.6.0 on Linux); use the *_ref function instead"
        )

    def __call__(self, *args, **kwargs):
        return self[None]


def jit(fn=None, *, do_not_specialize: tuple[str, ...] = ()):
    """triton.jit when triton is importable, else a stub that raises when launched (so modules always import).

    do_not_specialize: integer arguments triton should not specialise on (== 1, divisible by 16). Row counts and
    loop bounds gain nothing from it, and each specialisation is another compile: a launcher whose row count follows
    the batch would otherwise compile again for many CUDA-graph buckets.
    """

    def wrap(fn):
        if triton is None:
            return _UnavailableKernel(fn.__name__)
        return triton.jit(fn, do_not_specialize=list(do_not_specialize))

    return wrap if fn is None else wrap(fn)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launch(kernel, name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error before a launch that cannot work: no triton, or CPU tensors without the interpreter."""
    if triton is None or isinstance(kernel, _UnavailableKernel):
        kernel[None]  # raises the RuntimeError naming the fix
    on_cpu = any(t.device.type != "cuda" for t in tensors)
    is_interpreted = type(kernel).__name__ == "InterpretedFunction"
    if on_cpu and not is_interpreted and not _driver_records_launches():
        raise ValueError(
            f"{name}: tensors on {tensors[0].device} need the triton interpreter: set TRITON_INTERPRET=1 before "
            f"importing kernels, or call {name}_ref on CPU"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")


def _driver_records_launches() -> bool:
    """True when triton's active driver records launches instead of running them (benchmarks/compile_check.py's stub
    for a GPU that is not there): host tensors then only carry the shapes, dtypes and alignments being recorded."""
    try:
        return bool(getattr(triton.runtime.driver.active, "records_launches", False))
    except RuntimeError:  # no GPU driver is active on this machine
        return False


def check_float(name: str, what: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: {what} must be float32, bfloat16 or float16, got {tensor.dtype}")


def check_fields(name: str, what: str, value, kind: str, fields: tuple[str, ...]) -> None:
    """`value` describes weights as calm_engine.engine.weights' `kind` does (the kernels read those fields only)."""
    missing = [field for field in fields if not hasattr(value, field)]
    if missing:
        raise ValueError(
            f"{name}: {what} must describe the weights as calm_engine.engine.weights.{kind} does (fields "
            f"{', '.join(fields)}), got {type(value).__name__} without {', '.join(missing)}"
        )


def check_silu(name: str, mlps) -> None:
    """The fused gated MLPs implement SiLU gating only."""
    for mlp in mlps:
        if mlp.activation != "silu":
            raise ValueError(f"{name}: the fused kernels implement the 'silu' activation only, got {mlp.activation!r}")


def check_int(name: str, what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: {what} must be an int32 or int64 tensor, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: {what} must have shape {list(shape)}, got {list(tensor.shape)}")


MIN_TILE = 16  # tl.dot needs every tile dimension >= 16 on hardware (the interpreter accepts smaller ones)
MAX_TILE = 256


def check_tile(name: str, what: str, size) -> int:
    """A tile-size override: a power of two in [MIN_TILE, MAX_TILE], else a ValueError naming it."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_TILE <= size <= MAX_TILE or size & (size - 1):
        raise ValueError(
            f"{name}: {what} must be a power of two from {MIN_TILE} to {MAX_TILE} (tl.dot needs tiles of at least "
            f"{MIN_TILE}), got {size!r}"
        )
    return size


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in full IEEE precision (the references run fp32 without TF32); half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_depth(dtype: torch.dtype) -> int:
    """The K extent of one tl.dot step. IEEE fp32 dots run on FMA units, which hold both operands' whole K slices in
    registers: 64 deep, a 64 x 64 fp32 tile spilled 1.2 KB (ptxas, sm_90); 16 deep it does not. Tensor cores take 64."""
    return 16 if dtype == torch.float32 else 64


def dot_warps(rows: int, cols: int) -> int:
    """Warps for a GEMM tile: 8 from 64 x 64 up (4 left 255 registers and spills on unaligned shapes), else 4."""
    return 8 if rows * cols >= 64 * 64 else 4


def num_warps_for(block: int) -> int:
    """Warps for a row kernel whose widest tile has `block` elements: one warp per 256 elements, 1 to 16."""
    return max(1, min(16, block // 256))

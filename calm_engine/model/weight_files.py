"""Weight files and the checks every checkpoint loader shares: reading safetensors / pickles / shards, writing them,
comparing a model's expected tensors with a file's, device and dtype names, and the checkpoint's tokenizer.

Used by the CALM loader (checkpoint.py) and the token-level one (token_llama.py); it imports neither.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calm_engine.tokenizer import find_tokenizer, load_tokenizer

SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint directory or weight file is missing, corrupt, or does not match the config."""


def has_weights(directory: Path) -> bool:
    names = (SAFETENSORS_FILE, PICKLE_FILE, SAFETENSORS_FILE + ".index.json", PICKLE_FILE + ".index.json")
    return any((directory / name).is_file() for name in names)


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory by name, on the CPU, as stored (safetensors preferred)."""
    directory = Path(directory)
    for index_name, single_name in (
        (SAFETENSORS_FILE + ".index.json", SAFETENSORS_FILE),
        (PICKLE_FILE + ".index.json", PICKLE_FILE),
    ):
        if (directory / single_name).is_file():
            return _read_file(directory / single_name)
        if (directory / index_name).is_file():
            return _read_shards(directory / index_name)
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_FILE}, {PICKLE_FILE} or a sharded *.index.json"
    )


def _read_shards(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a valid shard index ({error})") from None
    weights = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path} lists shard {shard}, which is missing")
        weights.update(_read_file(shard_path))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found in their shards: {missing}")
    return weights


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            return load_file(path)
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({error})") from None
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): it holds more than tensors ({error})"
        ) from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return weights


def write_weights(state: dict[str, torch.Tensor], directory: Path, safetensors: bool) -> None:
    state = {k: v.detach().cpu() for k, v in state.items()}
    if safetensors:
        # safetensors cannot alias: every tensor gets its own storage. transformers' from_pretrained requires the
        # "format" metadata, so the official code can load these files too.
        tensors = {k: v.clone().contiguous() for k, v in state.items()}
        save_file(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    else:
        torch.save(state, directory / PICKLE_FILE)


def check_weights(
    expected: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor],
    *,
    optional: set[str] = frozenset(),
    skip_prefix: str | None = None,
    label: str = "",
    name=lambda key: key,
) -> list[str]:
    """Every problem between the model's expected tensors and the checkpoint's, one line each (keys shown by name)."""
    if skip_prefix:
        expected = {k: v for k, v in expected.items() if not k.startswith(skip_prefix)}
    problems = [
        f"missing tensor {label}{name(k)} {list(v.shape)}"
        for k, v in expected.items()
        if k not in found and k not in optional
    ]
    problems += [f"unexpected tensor {label}{name(k)} {list(v.shape)}" for k, v in found.items() if k not in expected]
    for key, tensor in found.items():
        if key in expected and tensor.shape != expected[key].shape:
            problems.append(
                f"shape mismatch for {label}{name(key)}: checkpoint {list(tensor.shape)}, "
                f"config {list(expected[key].shape)}"
            )
        elif key in expected and not tensor.is_floating_point():
            problems.append(f"tensor {label}{name(key)} has dtype {tensor.dtype}, expected a floating-point dtype")
        elif key in expected and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            problems.append(
                f"tensor {label}{name(key)} holds {nan:,} NaN and {inf:,} infinite values of {tensor.numel():,}"
            )
    return problems


def raise_problems(directory: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        raise CheckpointError(f"{directory}: {problems[0]}")
    if problems:
        raise CheckpointError(f"{directory}: {len(problems)} problems with the weights:\n  " + "\n  ".join(problems))


def cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}


def existing_dir(path: str | Path, what: str) -> Path:
    directory = Path(path)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; give the {what} directory that holds config.json")
    if not directory.is_dir():
        raise CheckpointError(f"{what} directory not found: {directory}")
    return directory


def resolve_device(device: str | torch.device) -> torch.device:
    """A CPU or an available CUDA device; anything else is refused by name."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asks for CUDA, but this torch ({torch.__version__}) sees no CUDA GPU: use "
                "device 'cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


def tokenizer_for(directory: Path, tokenizer: str | Path | None, pad_token_id: int | None):
    if tokenizer is not None:
        return load_tokenizer(tokenizer, pad_token_id)
    return find_tokenizer(directory, pad_token_id)

"""Named benchmark shapes (CalmConfig / AutoencoderConfig fields, or TokenLlamaConfig fields for the token-level
baselines `<shape>_token`) and random-weight checkpoints of them.

python -m benchmarks.shapes small OUT_DIR     # writes (or reuses) a random checkpoint in the official layout
python -m benchmarks.shapes small_token OUT_DIR   # the K = 1 baseline of the same backbone, a LlamaForCausalLM folder
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

# `tests.model_factory` holds the one random-weight recipe; benchmarks run from the repository root or from pytest
# with only benchmarks/ on sys.path, so make the root importable either way.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from calm_engine.model.calm import CalmModel  # noqa: E402
from calm_engine.model.checkpoint import save_calm  # noqa: E402
from calm_engine.model.config import AutoencoderConfig, CalmConfig, TokenLlamaConfig  # noqa: E402
from calm_engine.model.token_llama import TokenLlama, save_token_llama  # noqa: E402
from tests.model_factory import randomize_  # noqa: E402

# Positions count chunks: 2048 chunks hold the longest benchmark (prompt 512 + 64 new tokens = 144 chunks of 4).
MAX_CHUNKS = 2048

# Overhead-bound: every matrix is small, so per-step framework cost dominates the arithmetic.
SMALL = {
    "shared": dict(vocab_size=8192, patch_size=4, latent_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "calm": dict(
        noise_size=64,
        num_mlp_layers=1,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_CHUNKS,
    ),
    "autoencoder": dict(hidden_size=128, intermediate_size=320, num_encoder_layers=2, num_decoder_layers=2),
}

# The paper's CALM-M sizes. The released model's vocabulary is Llama-3's 128,256 plus an added [PAD] (128,257, pad
# 128,256); the benchmark keeps the 128,256 the engine issue names, so pad is a reserved special token instead.
CALM_M = {
    "shared": dict(
        vocab_size=128256,
        patch_size=4,
        latent_size=128,
        pad_token_id=128002,  # <|reserved_special_token_0|>
        bos_token_id=128000,  # <|begin_of_text|>
        eos_token_id=128001,  # <|end_of_text|>
    ),
    "calm": dict(
        noise_size=64,
        num_mlp_layers=4,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=MAX_CHUNKS,
    ),
    "autoencoder": dict(hidden_size=512, intermediate_size=1280, num_encoder_layers=2, num_decoder_layers=2),
}

# Row counts the kernels are checked and timed at (kernel_cases.py, compile_check.py): "cpu" keeps every torch
# reference under about a second on a 2-core machine; "calm-m" is the real thing (a decode step of 8 rows x 200 head
# samples, 200 latents decoded, a 4k-token prompt encoded, 64 rows attending over 4096 positions).
KERNEL_SIZES = {
    "cpu": dict(head_rows=1, samples=200, decode_rows=8, encode_rows=64, batch=8, context=1024, noise_rows=64),
    "calm-m": dict(head_rows=8, samples=200, decode_rows=200, encode_rows=1024, batch=64, context=4096, noise_rows=64),
}

# A token model's positions count tokens: the same 8,192-token context as a K = 4 CALM model of MAX_CHUNKS.
MAX_TOKENS = 4 * MAX_CHUNKS
BACKBONE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
TOKEN_ID_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def token_shape(calm_shape: dict) -> dict:
    """The token-level baseline of a CALM shape (issue 3, 8c): the same backbone and vocabulary, K = 1, an LM head."""
    backbone = {name: calm_shape["calm"][name] for name in BACKBONE_FIELDS}
    token_ids = {name: calm_shape["shared"][name] for name in TOKEN_ID_FIELDS}
    return {"token": dict(**backbone, **token_ids, max_position_embeddings=MAX_TOKENS)}


SMALL_TOKEN = token_shape(SMALL)
CALM_M_TOKEN = token_shape(CALM_M)

SHAPES = {"small": SMALL, "calm_m": CALM_M, "small_token": SMALL_TOKEN, "calm_m_token": CALM_M_TOKEN}

# Written last into a checkpoint directory; its content says which shape, seed and recipe the weights came from.
STAMP_FILE = "benchmark_shape.json"
CACHE_ENV = "CALM_BENCH_CACHE"


def shape(shape_name: str) -> dict:
    if shape_name not in SHAPES:
        raise ValueError(f"unknown benchmark shape {shape_name!r}; known: {sorted(SHAPES)}")
    return SHAPES[shape_name]


def is_token_shape(shape_name: str) -> bool:
    return "token" in shape(shape_name)


def token_config(shape_name: str) -> TokenLlamaConfig:
    """The validated config of a token-level shape."""
    if not is_token_shape(shape_name):
        raise ValueError(f"{shape_name!r} is a CALM shape; token-level shapes: {_names(token=True)}")
    config = TokenLlamaConfig(**shape(shape_name)["token"])
    config.validate(f"shape {shape_name}")
    return config


def configs(shape_name: str) -> tuple[CalmConfig, AutoencoderConfig]:
    """The validated CALM and autoencoder configs of a named shape."""
    if is_token_shape(shape_name):
        raise ValueError(f"{shape_name!r} is a token-level shape (see token_config); CALM: {_names(token=False)}")
    fields = shape(shape_name)
    calm_config = CalmConfig(**fields["shared"], **fields["calm"])
    ae_config = AutoencoderConfig(**fields["shared"], **fields["autoencoder"])
    calm_config.validate(f"shape {shape_name}")
    ae_config.validate(f"shape {shape_name} autoencoder")
    calm_config.check_autoencoder(ae_config, f"shape {shape_name}")
    return calm_config, ae_config


def _names(token: bool) -> list[str]:
    return sorted(name for name in SHAPES if is_token_shape(name) == token)


def _stamp(shape_name: str, seed: int) -> str:
    # A change to the recipe's source must not reuse weights drawn by the old one.
    recipe = hashlib.sha256(inspect.getsource(randomize_).encode()).hexdigest()[:16]
    stamp = {"shape": shape_name, "seed": seed, "recipe": recipe}
    if is_token_shape(shape_name):
        stamp["token_llama"] = token_config(shape_name).to_dict()
    else:
        calm_config, ae_config = configs(shape_name)
        stamp.update(calm=calm_config.to_dict(), autoencoder=ae_config.to_dict())
    return json.dumps(stamp, indent=2, sort_keys=True) + "\n"


def write_random_checkpoint(shape_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight CalmModel of `shape_name` saved in the official layout (safetensors) at `out_dir`, or for a
    token-level shape a random TokenLlama in the Hugging Face Llama layout.

    Reuses `out_dir` when it already holds this shape, seed and recipe; refuses to overwrite a non-empty directory
    that is not a benchmark checkpoint.
    """
    out_dir = Path(out_dir)
    stamp = _stamp(shape_name, seed)
    stamp_path = out_dir / STAMP_FILE
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        return out_dir
    if out_dir.is_dir() and any(out_dir.iterdir()) and not stamp_path.is_file():
        raise ValueError(f"{out_dir} is not empty and holds no {STAMP_FILE}; refusing to overwrite it")
    stamp_path.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    if is_token_shape(shape_name):
        save_token_llama(randomize_(TokenLlama(token_config(shape_name)), seed), out_dir)
    else:
        calm_config, ae_config = configs(shape_name)
        model = randomize_(CalmModel(calm_config, ae_config), seed).eval().requires_grad_(False)
        save_calm(model, out_dir, safetensors=True)
    stamp_path.write_text(stamp)
    return out_dir


def cached_checkpoint(shape_name: str, seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """write_random_checkpoint into `<cache_root>/<shape>-seed<seed>`; the root defaults to $CALM_BENCH_CACHE, else
    ~/.cache/calm-engine/bench."""
    if cache_root is None:
        cache_root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "calm-engine" / "bench"
    return write_random_checkpoint(shape_name, Path(cache_root) / f"{shape_name}-seed{seed}", seed)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write (or reuse) a random-weight checkpoint of a benchmark shape.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_checkpoint(args.shape, args.out_dir, args.seed))


if __name__ == "__main__":
    main()

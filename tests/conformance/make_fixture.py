"""Write a conformance fixture for a differently-shaped random model, in the official checkpoint layout.

    python -m tests.conformance.make_fixture OUT_DIR --variant k2-gqa

The checkpoints are written by calm_engine's own saver (official key names, .bin and safetensors copies, ae_path
relative to the fixture root); the expected outputs are computed by calm_engine's reference model in float64. So a
fixture made here checks that the suite and the loader are shape-agnostic and that the saver writes what the loader
reads; agreement with the official implementation is what the fixtures it produced (../shared/conformance) check.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from calm_engine.model.checkpoint import save_autoencoder, save_calm
from tests.conformance.fixture_format import CHECKPOINT_DIRS, FORMAT
from tests.model_factory import random_calm_model

VARIANTS = {
    # The shapes the core issue names: K=2, grouped-query attention, rope_theta 5e5, a deeper autoencoder, other
    # norm epsilons and vocabulary, and a pad id that is not 0.
    "k2-gqa": dict(
        vocab_size=300,
        patch_size=2,
        latent_size=12,
        pad_token_id=299,
        ae=dict(hidden_size=48, intermediate_size=112, num_encoder_layers=4, num_decoder_layers=4, rms_norm_eps=1e-5),
        calm=dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            noise_size=8,
            num_mlp_layers=3,
            max_position_embeddings=256,
        ),
    ),
    # K=8, biases everywhere, linear rope scaling, one generator block.
    "k8-bias": dict(
        vocab_size=700,
        patch_size=8,
        latent_size=24,
        pad_token_id=3,
        ae=dict(hidden_size=32, intermediate_size=96, mlp_bias=True),
        calm=dict(
            hidden_size=96,
            intermediate_size=200,
            num_attention_heads=6,
            num_key_value_heads=3,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={"type": "linear", "factor": 2.0},
            noise_size=16,
            num_mlp_layers=1,
            max_position_embeddings=256,
        ),
    ),
}
MIN_TOP2_GAP = 1e-4  # argmax decisions closer than this could flip between float32 and float64


class FixtureWriter:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.cases: dict[str, dict] = {}
        self.min_gap = float("inf")

    def add(self, case: str, description: str, inputs: list[str], outputs: dict[str, torch.Tensor], **extra):
        for name, tensor in outputs.items():
            self.tensors[f"{case}.{name}"] = tensor.detach().float() if tensor.is_floating_point() else tensor
        self.cases[case] = {
            "description": description,
            "inputs": [self._spec(name) for name in inputs],
            "outputs": [self._spec(f"{case}.{name}") for name in outputs],
            **extra,
        }

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.topk(2, dim=-1).values
        self.min_gap = min(self.min_gap, float((top2[..., 0] - top2[..., 1]).min()))
        return logits.argmax(-1)

    def _spec(self, name: str) -> dict:
        tensor = self.tensors[name]
        return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def uniform_noise(*shape: int) -> torch.Tensor:
    """The reference's convention: torch.rand - 0.5, float32, uniform on [-0.5, 0.5)."""
    return torch.rand(*shape) - 0.5


@torch.no_grad()
def make_fixture(out: Path, variant: str, seed: int = 0) -> None:
    spec = VARIANTS[variant]
    shared = {k: v for k, v in spec.items() if k not in ("ae", "calm")}
    model = random_calm_model(seed=seed, ae=spec["ae"], calm=spec["calm"], **shared)
    out.mkdir(parents=True, exist_ok=True)
    for fmt, (ae_dir, calm_dir) in CHECKPOINT_DIRS.items():
        save_autoencoder(model.autoencoder, out / ae_dir, safetensors=fmt == "safetensors")
        save_calm(model, out / calm_dir, safetensors=fmt == "safetensors", ae_path=ae_dir, write_autoencoder=False)

    reference = copy.deepcopy(model).double()
    config = model.config
    k, vocab = config.chunk_size, config.vocab_size
    torch.manual_seed(seed + 1)
    writer = FixtureWriter()

    ids = torch.randint(0, vocab, (2, 3 * k))
    writer.tensors["ae_encode.input_ids"] = ids
    mean, log_std = reference.autoencoder.encode(ids)
    writer.add("ae_encode", "autoencoder encoder", ["ae_encode.input_ids"], {"mean": mean, "log_std": log_std})
    writer.add(
        "ae_roundtrip",
        "decode(encode(ids).mean) argmax",
        ["ae_encode.input_ids"],
        {"ids": writer.argmax(reference.autoencoder.decode(mean))},
    )

    latents = torch.randn(2, 3, config.latent_size)
    writer.tensors["ae_decode.latents"] = latents
    logits = reference.autoencoder.decode(latents.double())
    writer.add(
        "ae_decode", "autoencoder decoder", ["ae_decode.latents"], {"logits": logits, "ids": writer.argmax(logits)}
    )

    ids = torch.randint(0, vocab, (2, 5 * k))
    writer.tensors["lm_prefill.input_ids"] = ids
    hidden = reference.hidden_states(ids)
    writer.add(
        "lm_prefill",
        "backbone on the whole prompt",
        ["lm_prefill.input_ids"],
        {"inputs_embeds": reference.compress(ids), "hidden": hidden},
    )
    writer.add(
        "lm_decode",
        "first 2 chunks at once, then one chunk per call with the KV cache",
        ["lm_prefill.input_ids"],
        {"hidden_prefill": hidden[:, :2], "hidden_steps": hidden[:, 2:].transpose(0, 1)},
        prefill_chunks=2,
    )

    head_hidden = hidden.reshape(-1, config.hidden_size).float()
    noise = uniform_noise(head_hidden.shape[0], config.noise_size)
    writer.tensors["head_sample.hidden"], writer.tensors["head_sample.noise"] = head_hidden, noise
    latent = reference.sample_latent(head_hidden.double(), noise.double())
    patch_logits = reference.autoencoder.decode(latent[:, None])
    writer.add(
        "head_sample",
        "generator with explicit noise, decoded by argmax",
        ["head_sample.hidden", "head_sample.noise"],
        {"latent": latent, "patch_logits": patch_logits, "patch_ids": writer.argmax(patch_logits)},
    )

    pool_noise = uniform_noise(2, 50, config.noise_size)
    writer.tensors["temperature_sampling_t05.noise"] = pool_noise
    pool_latents = reference.sample_latent(head_hidden[:2, None].double().expand(2, 50, -1), pool_noise.double())
    pool = writer.argmax(reference.autoencoder.decode(pool_latents.reshape(100, 1, -1))).reshape(2, 50, k)
    writer.add(
        "temperature_sampling_t05",
        "the candidate pool of temperature sampling (pool only)",
        ["head_sample.hidden", "temperature_sampling_t05.noise"],
        {"pool_ids": pool},
    )
    writer.cases["temperature_sampling_t05"]["inputs"][0]["rows"] = "0:2"

    ids = torch.randint(0, vocab, (1, 6 * k))
    brier_noise = uniform_noise(8, 5, config.noise_size)
    writer.tensors["brier.input_ids"], writer.tensors["brier.rand_noise.0"] = ids, brier_noise
    brier_hidden = reference.hidden_states(ids)[0, :-1]
    target_mean, target_log_std = reference.autoencoder.encode(ids[:, k:])
    writer.add(
        "brier",
        "Brier inputs: the targets' posterior and the first two head samples (values not recorded)",
        ["brier.input_ids", "brier.rand_noise.0"],
        {
            "first_two_latents": reference.sample_latent(brier_hidden.expand(2, -1, -1), brier_noise[:2].double()),
            "target_mean": target_mean,
            "target_log_std": target_log_std,
        },
    )

    if writer.min_gap < MIN_TOP2_GAP:
        raise RuntimeError(f"an argmax decision has a top-2 gap of {writer.min_gap:.2g}; use another seed")
    save_file({k: v.contiguous() for k, v in writer.tensors.items()}, out / "expected.safetensors")
    meta = {
        "variant": variant,
        "generated_by": "calm_engine tests/conformance/make_fixture.py (expected outputs: its float64 reference)",
        "seed": seed,
        "min_top2_logit_gap": writer.min_gap,
        "calm_config": model.config.to_dict(),
        "ae_config": model.autoencoder.config.to_dict(),
    }
    spec_json = {"format": FORMAT, "tensors_file": "expected.safetensors", "cases": writer.cases, "meta": meta}
    (out / "cases.json").write_text(json.dumps(spec_json, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="k2-gqa")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_fixture(args.out, args.variant, args.seed)


if __name__ == "__main__":
    main()

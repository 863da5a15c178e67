"""Stage 2: train the CALM language model (input compression, Llama backbone, energy head) with the energy loss on
top of a frozen autoencoder, and save it in the official layout with the autoencoder embedded.

The hidden state after chunk i predicts chunk i+1. Targets are M samples from the autoencoder's posterior
N(mean, std^2) of the true next chunk; predictions are N head samples from uniform noise. As in the official
trainer, every chunk of the stream is a target (no pad/eos masking: the stream has no padding) and the latents are
used as the encoder gives them (no rescaling).

Beyond the official trainer, an optional auxiliary loss (`probe_weight`, off by default) adds the cross-entropy of
the next chunk's tokens decoded, by the frozen autoencoder, from a linear map of the hidden state. It exists only
during training (the saved model is the official layout); see NextChunkProbe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calm_engine.model.calm import CalmModel
from calm_engine.model.checkpoint import load_autoencoder, save_calm
from calm_engine.model.config import CalmConfig
from calm_engine.train.loop import (
    LoopConfig,
    SpecialIds,
    check_stream,
    copy_tokenizer,
    count_parameters,
    eval_windows,
    init_weights_,
    train_loop,
)

TARGET_SAMPLES = 100  # M, hard-coded in the official energy_score


def energy_loss(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The negative energy score (alpha = 1) of N model samples against M target samples, per leading position.

    samples [..., N, l], targets [..., M, l] -> [...]:
        2 * mean_{n,m} |targets_m - samples_n| - sum_{n != k} |samples_n - samples_k| / (N (N - 1))
    Minimised in expectation when the samples' distribution equals the targets' (the score is strictly proper).
    """
    if samples.dim() < 2 or samples.shape[:-2] != targets.shape[:-2] or samples.shape[-1] != targets.shape[-1]:
        raise ValueError(
            f"samples [..., N, l] and targets [..., M, l] must share leading dims and l, got "
            f"{list(samples.shape)} and {list(targets.shape)}"
        )
    n = samples.shape[-2]
    if n < 2:
        raise ValueError(f"the energy loss needs at least 2 model samples per position, got {n}")
    lead = samples.shape[:-2]
    samples = samples.reshape(-1, n, samples.shape[-1])
    targets = targets.reshape(-1, targets.shape[-2], targets.shape[-1])
    # The n == k terms of the sum are zero distances, so summing all pairs is the sum over n != k.
    spread = torch.cdist(samples, samples).sum(dim=(-2, -1)) / (n * (n - 1))
    fit = torch.cdist(samples, targets).mean(dim=(-2, -1))
    return (2 * fit - spread).reshape(lead)


@dataclass(frozen=True)
class CalmTrainConfig(LoopConfig):
    """The CALM model to train and how. K and the latent size come from the autoencoder; window_tokens must be a
    multiple of K. The saved model's context is window_tokens // K chunks."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_mlp_layers: int = 2
    noise_size: int = 64
    num_samples: int = 8  # N model samples per position
    target_samples: int = TARGET_SAMPLES  # M posterior samples per position
    init_std: float = 0.02
    probe_weight: float = 0.0  # weight of the NextChunkProbe cross-entropy; 0 trains as the official recipe

    def __post_init__(self):
        super().__post_init__()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "noise_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.num_mlp_layers, bool) or not isinstance(self.num_mlp_layers, int) or self.num_mlp_layers < 0:
            raise ValueError(f"num_mlp_layers must be an integer >= 0, got {self.num_mlp_layers!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise ValueError(f"num_samples (N) must be an integer >= 2 for the energy loss, got {self.num_samples!r}")
        if isinstance(self.target_samples, bool) or not isinstance(self.target_samples, int) or self.target_samples < 1:
            raise ValueError(f"target_samples (M) must be an integer >= 1, got {self.target_samples!r}")
        if not 0 < self.init_std < math.inf:
            raise ValueError(f"init_std must be a positive finite number, got {self.init_std!r}")
        if isinstance(self.probe_weight, bool) or not 0 <= self.probe_weight < math.inf:
            raise ValueError(f"probe_weight must be a finite number >= 0, got {self.probe_weight!r}")

    def model_config(self, chunk_size: int, latent_size: int, vocab_size: int, special: SpecialIds) -> CalmConfig:
        if self.window_tokens % chunk_size or self.window_tokens < 2 * chunk_size:
            raise ValueError(
                f"window_tokens ({self.window_tokens}) must be a multiple of the autoencoder's K={chunk_size} and "
                f"hold at least 2 chunks (one input, one target)"
            )
        config = CalmConfig(
            patch_size=chunk_size,
            latent_size=latent_size,
            noise_size=self.noise_size,
            num_mlp_layers=self.num_mlp_layers,
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.window_tokens // chunk_size,
            pad_token_id=special.pad_token_id,
            bos_token_id=special.bos_token_id,
            eos_token_id=special.eos_token_id,
            num_samples=self.num_samples,
            initializer_range=self.init_std,
        )
        config.validate()
        return config


class NextChunkProbe(nn.Module):
    """A training-only linear map from the backbone's hidden state to a latent, which the frozen autoencoder decodes
    into logits for the next chunk's K tokens; its cross-entropy is a direct signal that the hidden state must carry
    the next chunk. Added because, with the energy loss alone, our small model barely used its context (head samples
    for different contexts 3.5 apart against 12.3 for different noise); it sped up the energy loss's early descent
    but did not change that (benchmarks/RESULTS.md). Not saved with the model."""

    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, latent_size)

    def cross_entropy(self, model: CalmModel, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, n, hidden] after chunks 0..n-1, next_ids [B, n*K] (chunks 1..n) -> mean CE per token."""
        logits = model.autoencoder.decode(self.proj(hidden)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), next_ids.reshape(-1))


def calm_loss(
    model: CalmModel,
    windows: torch.Tensor,
    num_samples: int,
    target_samples: int,
    generator: torch.Generator,
    probe: NextChunkProbe | None = None,
    probe_weight: float = 0.0,
) -> torch.Tensor:
    """The training loss: calm_loss_terms' energy loss, plus probe_weight times the probe's cross-entropy."""
    energy, probe_ce = calm_loss_terms(model, windows, num_samples, target_samples, generator, probe)
    return energy if probe_ce is None or probe_weight == 0 else energy + probe_weight * probe_ce


def calm_loss_terms(
    model: CalmModel,
    windows: torch.Tensor,
    num_samples: int,
    target_samples: int,
    generator: torch.Generator,
    probe: NextChunkProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean energy loss over every predicted chunk of windows [B, n*K]: the backbone reads chunks 0..n-2 and the
    head's N samples at chunk i are scored against M posterior samples of chunk i+1. With a probe, also its
    cross-entropy on the same hidden states (else None)."""
    k = model.config.chunk_size
    hidden = model.backbone(model.compress(windows[:, :-k]))  # [B, n-1, hidden], causal over chunks
    with torch.no_grad():
        mean, log_std = model.autoencoder.encode(windows[:, k:])  # [B, n-1, latent] each
        eps = torch.randn((target_samples, *mean.shape), generator=generator)
        targets = (mean + eps * log_std.exp()).movedim(0, -2)  # [B, n-1, M, latent]
    noise = torch.rand((num_samples, *hidden.shape[:-1], model.config.noise_size), generator=generator) - 0.5
    samples = model.generative_head(hidden.expand(num_samples, *hidden.shape), noise).movedim(0, -2)
    energy = energy_loss(samples.float(), targets.float()).mean()  # distances in float32 even under bf16 autocast
    return energy, None if probe is None else probe.cross_entropy(model, hidden, windows[:, k:])


@torch.no_grad()
def chunk_accuracy(model: CalmModel, windows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fraction of next-chunk tokens that one head sample, decoded greedily, gets right."""
    k = model.config.chunk_size
    hidden = model.backbone(model.compress(windows[:, :-k]))
    noise = torch.rand((*hidden.shape[:-1], model.config.noise_size), generator=generator) - 0.5
    predicted = model.autoencoder.decode_ids(model.generative_head(hidden, noise))
    return (predicted == windows[:, k:]).float().mean()


def train_calm(
    config: CalmTrainConfig,
    autoencoder_dir: str | Path,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    vocab_size: int,
    special_ids: SpecialIds,
    out_dir: str | Path,
    *,
    tokenizer_json: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a CALM model on the frozen autoencoder in `autoencoder_dir` and save it to `out_dir`, which
    `calm_engine.load` and `calm_engine.LLM` then read (the autoencoder embedded and beside it in out_dir/autoencoder,
    the tokenizer copied from `tokenizer_json` when given).

    Returns train_loss (with the probe's term) / heldout_loss (energy loss alone), heldout_chunk_accuracy (and
    heldout_probe_ce with a probe), tokens_per_second, seconds, parameters (the saved model's trained ones) and the
    evaluation history.
    """
    autoencoder = load_autoencoder(autoencoder_dir)
    ae_config = autoencoder.config
    if ae_config.vocab_size != vocab_size:
        raise ValueError(
            f"vocab_size is {vocab_size} but the autoencoder in {autoencoder_dir} has {ae_config.vocab_size}"
        )
    special_ids.check(vocab_size)
    model_config = config.model_config(ae_config.chunk_size, ae_config.latent_size, vocab_size, special_ids)
    check_stream("train_stream", train_stream, vocab_size, config.window_tokens)
    check_stream("heldout_stream", heldout_stream, vocab_size, config.window_tokens)

    model = CalmModel(model_config, ae_config)
    model.autoencoder = autoencoder  # frozen: loaded with requires_grad off, never in the optimiser
    generator = torch.Generator().manual_seed(config.seed)
    for part in (model.backbone, model.embed_proj, model.generative_head):
        init_weights_(part, config.init_std, generator, special_ids.pad_token_id)
    # The official MLPGenerator.initialize_weights: the head starts by predicting the zero latent.
    torch.nn.init.zeros_(model.generative_head.final_layer.linears[-1].weight)
    torch.nn.init.zeros_(model.generative_head.final_layer.linears[-1].bias)
    params = [(name, p) for name, p in model.named_parameters() if not name.startswith("autoencoder.")]
    model_parameters = count_parameters(params)
    log(f"CALM: {model_parameters / 1e6:.2f}M trained parameters, K={model_config.chunk_size}")
    probe = None
    if config.probe_weight > 0:
        probe = NextChunkProbe(model_config.hidden_size, model_config.latent_size)
        init_weights_(probe, config.init_std, generator)
        params += [(f"probe.{name}", p) for name, p in probe.named_parameters()]  # trained, never saved

    noise_generator = torch.Generator().manual_seed(config.seed + 2)
    heldout = eval_windows(heldout_stream, config)

    def loss_fn(windows: torch.Tensor) -> torch.Tensor:
        return calm_loss(
            model, windows, config.num_samples, config.target_samples, noise_generator, probe, config.probe_weight
        )

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        fixed = torch.Generator().manual_seed(config.seed + 3)  # the same noise every evaluation
        terms = [calm_loss_terms(model, w, config.num_samples, config.target_samples, fixed, probe) for w in heldout]
        accuracies = [chunk_accuracy(model, w, fixed) for w in heldout]
        metrics = {
            # the energy loss alone, comparable across recipes
            "heldout_loss": torch.stack([energy for energy, _ in terms]).mean().item(),
            "heldout_chunk_accuracy": torch.stack(accuracies).mean().item(),
        }
        if probe is not None:
            metrics["heldout_probe_ce"] = torch.stack([probe_ce for _, probe_ce in terms]).mean().item()
        return metrics

    metrics = train_loop(model, params, config, train_stream, loss_fn, evaluate, log)
    out_dir = Path(out_dir)
    save_calm(model.requires_grad_(False), out_dir)
    copy_tokenizer(tokenizer_json, out_dir)
    log(f"saved to {out_dir}")
    return {**metrics, "parameters": model_parameters}

"""Stage 1: train the variational chunk autoencoder (CALM.md section 1.1) and measure how well it reconstructs.

The loss follows the official training: loss = CE * K + kl_weight * KL, where KL is the posterior's divergence from
N(0, I) per latent dimension, clamped from below at kl_clamp and summed over dimensions; DropToken (input ids set to
0 at p) and DropLatent (dropout at p on z) regularise training only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.checkpoint import save_autoencoder
from calm_engine.model.config import AutoencoderConfig
from calm_engine.train.loop import init_weights_, warmup_cosine
from calm_engine.train.windows import random_windows

TRAINING_FILE = "training.json"  # the train config and final metrics, beside the checkpoint
NOISE_SIGMA = 0.3  # the noise level the paper's autoencoder withstands (CALM.md 1.1); reported next to sigma 0


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    # Model (AutoencoderConfig fields).
    hidden_size: int = 256
    intermediate_size: int = 640
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    latent_size: int = 32
    chunk_size: int = 4
    # Optimisation (AdamW as the official script: betas 0.9/0.95, weight decay 0.1, gradient clip 1.0).
    steps: int = 3000
    batch_chunks: int = 512  # chunks per step, each cut at a random offset of the training stream
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # cosine decay from lr to lr * this after warmup
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    init_std: float = 0.02  # normal init of every linear and embedding weight, as the official post_init
    # Regularisation (official defaults).
    drop_token: float = 0.15
    drop_latent: float = 0.15
    kl_clamp: float = 0.5
    kl_weight: float = 1e-3
    # Not in the official recipe: each training token is replaced, in input and target alike, by a uniformly random
    # id (never pad, which DropToken writes) with this probability. A small corpus leaves rare tokens' embeddings
    # untrained, and the autoencoder then fails every token it saw under 10 times; this shows it every id.
    random_token: float = 0.0
    # Not in the official recipe: the training sample z = mean + max(std, min_sample_std) * eps, so that the decoder
    # learns to read every dimension under at least this much noise (the KL term still sees the encoder's std).
    min_sample_std: float = 0.0
    # Running.
    bf16: bool = True  # bfloat16 autocast for the matmuls (2.7x the float32 GEMM rate on this CPU)
    seed: int = 0
    threads: int = 2
    log_interval: int = 100
    eval_interval: int = 1000
    eval_tokens: int = 65536  # held-out tokens per evaluation (the first ones of the held-out stream)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "latent_size", "chunk_size", "steps", "batch_chunks"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _check_int(name, getattr(self, name), 0)
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (two stages around the squeeze), got {getattr(self, name)}")
        for name in ("threads", "log_interval", "eval_interval", "eval_tokens"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "init_std", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("drop_token", "drop_latent", "random_token"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {getattr(self, name)}")
        for name in ("final_lr_fraction", "weight_decay", "kl_clamp", "kl_weight", "min_sample_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_interval % self.log_interval:
            raise ValueError(
                f"eval_interval ({self.eval_interval}) must be a multiple of log_interval ({self.log_interval})"
            )
        if self.eval_tokens < self.chunk_size:
            raise ValueError(f"eval_tokens {self.eval_tokens} must hold at least one chunk of {self.chunk_size}")

    def model_config(self, vocab_size: int) -> AutoencoderConfig:
        """The saved AutoencoderConfig; pad = 0 is the id DropToken writes, bos/eos follow train.bpe (1, 2)."""
        config = AutoencoderConfig(
            vocab_size=vocab_size,
            patch_size=self.chunk_size,
            latent_size=self.latent_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            ae_dropout=self.drop_token,
            kl_clamp=self.kl_clamp,
            kl_weight=self.kl_weight,
            initializer_range=self.init_std,
        )
        config.validate()
        return config


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The loss


def kl_per_dimension(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per dimension: (mean^2 + std^2 - 1 - 2 log_std) / 2, same shape as mean."""
    return 0.5 * (mean.square() + torch.exp(2 * log_std) - 1 - 2 * log_std)


def clamped_kl(mean: torch.Tensor, log_std: torch.Tensor, kl_clamp: float) -> torch.Tensor:
    """The KL term: per-dimension KL clamped from below at kl_clamp ("free bits": no pressure under it), summed over
    the latent dimensions, averaged over chunks. mean, log_std [..., latent] -> scalar."""
    return kl_per_dimension(mean, log_std).clamp(min=kl_clamp).sum(-1).mean()


@dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor  # ce * K + kl_weight * kl, what the optimiser minimises
    ce: torch.Tensor  # mean token cross-entropy (nats)
    kl: torch.Tensor  # clamped KL per chunk


def autoencoder_loss(
    autoencoder: Autoencoder,
    chunks: torch.Tensor,
    *,
    drop_token: float,
    drop_latent: float,
    kl_clamp: float,
    kl_weight: float,
    min_sample_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """The training loss on chunks [N, K] of token ids: encode the (token-dropped) ids, sample
    z = mean + max(std, min_sample_std) * eps, drop latent entries, decode, and score against the original ids."""
    inputs = chunks
    if drop_token > 0:
        keep = torch.rand(chunks.shape, generator=generator) >= drop_token
        inputs = chunks * keep  # dropped ids become 0, the pad id, as the official code does
    mean, log_std = autoencoder.encode(inputs)
    std = torch.exp(log_std).clamp(min=min_sample_std)  # a floor of 0 changes nothing
    z = mean + std * torch.randn(mean.shape, generator=generator)
    if drop_latent > 0:
        keep = (torch.rand(z.shape, generator=generator) >= drop_latent).to(z.dtype)
        z = z * keep / (1 - drop_latent)  # inverted dropout, as F.dropout
    logits = autoencoder.decode(z).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks.reshape(-1))
    kl = clamped_kl(mean.float(), log_std.float(), kl_clamp)
    return LossTerms(loss=ce * chunks.shape[-1] + kl_weight * kl, ce=ce, kl=kl)


# ---------------------------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def reconstruction_accuracy(
    autoencoder: Autoencoder,
    ids: torch.Tensor,
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
    batch_chunks: int = 1024,
) -> float:
    """Token accuracy of argmax(decode(mean + sigma * N(0, 1))) against `ids` (any shape, a whole number of chunks),
    chunk by chunk, without dropout."""
    chunks = _as_chunks(ids, autoencoder.config.chunk_size)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    correct = 0
    for batch in chunks.split(batch_chunks):
        mean, _ = autoencoder.encode(batch)
        if sigma > 0:
            mean = mean + sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        correct += int((autoencoder.decode_ids(mean) == batch).sum())
    return correct / chunks.numel()


@torch.no_grad()
def latent_statistics(autoencoder: Autoencoder, ids: torch.Tensor, kl_clamp: float) -> dict:
    """Mean KL per latent dimension over the chunks of `ids`; a dimension counts as active when its mean KL exceeds
    the clamp (below it the KL term exerts no pull, so the dimension is free to carry information or not)."""
    chunks = _as_chunks(ids, autoencoder.config.chunk_size)
    kl_sum = torch.zeros(autoencoder.config.latent_size, dtype=torch.float64)
    std_sum = 0.0
    for batch in chunks.split(4096):
        mean, log_std = autoencoder.encode(batch)
        kl_sum += kl_per_dimension(mean, log_std).reshape(-1, mean.shape[-1]).double().sum(0)
        std_sum += float(torch.exp(log_std).double().sum())
    kl = kl_sum / chunks.shape[0]
    return {
        "active_dims": int((kl > kl_clamp).sum()),
        "kl_per_dim_mean": float(kl.mean()),
        "kl_per_dim_min": float(kl.min()),
        "kl_per_dim_max": float(kl.max()),
        "posterior_std_mean": std_sum / (chunks.shape[0] * autoencoder.config.latent_size),
    }


def _as_chunks(ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if ids.numel() == 0 or ids.numel() % chunk_size:
        raise ValueError(f"{ids.numel()} token ids are not a positive whole number of chunks of K={chunk_size}")
    return ids.reshape(-1, chunk_size)


# ---------------------------------------------------------------------------------------------------------------
# Training


def substitute_random_tokens(
    chunks: torch.Tensor, rate: float, vocab_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """chunks with each id replaced at probability `rate` by one drawn uniformly from [1, vocab_size): the pad id 0
    stays the mark of a dropped token."""
    if vocab_size < 2:
        raise ValueError(f"random token substitution needs a vocabulary of at least 2 ids, got {vocab_size}")
    replace = torch.rand(chunks.shape, generator=generator) < rate
    random_ids = torch.randint(1, vocab_size, chunks.shape, generator=generator, dtype=chunks.dtype)
    return torch.where(replace, random_ids, chunks)


def learning_rate(config: AutoencoderTrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * final_lr_fraction at the last step."""
    return warmup_cosine(step, config.lr, config.warmup_steps, config.steps, config.final_lr_fraction)


def train_autoencoder(
    config: AutoencoderTrainConfig,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    vocab_size: int,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Train on random K-token chunks of `train_stream`, evaluate on `heldout_stream`, save the checkpoint (official
    layout, readable by calm_engine.load_autoencoder) and training.json to out_dir; returns the final metrics."""
    for name, stream in (("train_stream", train_stream), ("heldout_stream", heldout_stream)):
        if stream.dim() != 1 or stream.numel() < config.chunk_size:
            raise ValueError(f"{name} must be a 1-D stream of at least K={config.chunk_size} ids")
        if int(stream.min()) < 0 or int(stream.max()) >= vocab_size:
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size})")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    autoencoder = Autoencoder(config.model_config(vocab_size))
    init_weights_(autoencoder, config.init_std)  # the global RNG, seeded above
    optimizer = torch.optim.AdamW(
        autoencoder.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    heldout = _eval_ids(heldout_stream, config)
    loss_terms = dict(
        drop_token=config.drop_token,
        drop_latent=config.drop_latent,
        kl_clamp=config.kl_clamp,
        kl_weight=config.kl_weight,
        min_sample_std=config.min_sample_std,
        generator=generator,
    )

    last_log = time.perf_counter()
    train_seconds = 0.0  # forward, backward and update only: evaluations are not training throughput
    running = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        chunks = random_windows(train_stream, config.batch_chunks, config.chunk_size, generator)
        if config.random_token > 0:
            chunks = substitute_random_tokens(chunks, config.random_token, vocab_size, generator)
        autoencoder.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            terms = autoencoder_loss(autoencoder, chunks, **loss_terms)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        nn.utils.clip_grad_norm_(autoencoder.parameters(), config.grad_clip)
        optimizer.step()
        for key in running:
            running[key] += getattr(terms, key).item()

        done = step + 1
        if done % config.log_interval == 0 or done == config.steps:
            now, count = time.perf_counter(), done % config.log_interval or config.log_interval
            tokens_per_s = count * config.batch_chunks * config.chunk_size / (now - last_log)
            log(
                f"step {done}/{config.steps} loss {running['loss'] / count:.4f} ce {running['ce'] / count:.4f} "
                f"kl {running['kl'] / count:.2f} lr {learning_rate(config, step):.2e} tokens/s {tokens_per_s:,.0f}"
            )
            running = dict.fromkeys(running, 0.0)
            train_seconds += now - last_log
            last_log = now
        if done % config.eval_interval == 0 and done != config.steps:
            log(f"step {done} held-out {_format(evaluate(autoencoder, heldout, config))}")
            last_log = time.perf_counter()

    autoencoder.eval()
    metrics = {
        "steps": config.steps,
        "train_tokens": config.steps * config.batch_chunks * config.chunk_size,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(config.steps * config.batch_chunks * config.chunk_size / train_seconds),
        "heldout_tokens": heldout.numel(),
        **evaluate(autoencoder, heldout, config),
    }
    log(f"final held-out {_format(metrics)}")
    out_dir = Path(out_dir)
    save_autoencoder(autoencoder, out_dir)
    record = {"config": dataclasses.asdict(config), "metrics": metrics}
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return metrics


def _eval_ids(stream: torch.Tensor, config: AutoencoderTrainConfig) -> torch.Tensor:
    usable = min(stream.numel(), config.eval_tokens) // config.chunk_size * config.chunk_size
    return stream[:usable]


@torch.no_grad()
def evaluate(autoencoder: Autoencoder, ids: torch.Tensor, config: AutoencoderTrainConfig) -> dict:
    """Held-out reconstruction accuracy at sigma 0 and NOISE_SIGMA, CE of the posterior sample, latent statistics."""
    autoencoder.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    chunks = ids.reshape(-1, config.chunk_size)
    ce = sum(
        float(autoencoder_loss(autoencoder, batch, drop_token=0, drop_latent=0, kl_clamp=0, kl_weight=0).ce)
        * batch.shape[0]
        for batch in chunks.split(1024)
    )
    return {
        "heldout_ce": ce / chunks.shape[0],
        "accuracy_sigma_0": reconstruction_accuracy(autoencoder, ids),
        f"accuracy_sigma_{NOISE_SIGMA}": reconstruction_accuracy(autoencoder, ids, NOISE_SIGMA, generator),
        **latent_statistics(autoencoder, ids, config.kl_clamp),
    }


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())

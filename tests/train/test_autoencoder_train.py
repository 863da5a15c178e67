"""The autoencoder trainer: the clamped KL and the loss against hand computations, reconstruction accuracy against a
plain loop, a tiny model that learns, and a saved checkpoint that load_autoencoder reads back."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import calm_engine
from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.config import AutoencoderConfig
from calm_engine.train.autoencoder import (
    TRAINING_FILE,
    AutoencoderTrainConfig,
    autoencoder_loss,
    clamped_kl,
    kl_per_dimension,
    learning_rate,
    reconstruction_accuracy,
    substitute_random_tokens,
    train_autoencoder,
)
from calm_engine.train.loop import init_weights_

TINY = AutoencoderConfig(vocab_size=50, patch_size=4, latent_size=8, hidden_size=16, intermediate_size=32)


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    autoencoder = Autoencoder(TINY)
    init_weights_(autoencoder, 0.2)
    return autoencoder


def test_clamped_kl_by_hand():
    mean = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.5, -1.0]])
    log_std = torch.tensor([[0.0, math.log(0.5), 0.0], [math.log(2.0), 0.0, math.log(0.3)]])
    rows = []
    for m_row, s_row in zip(mean.tolist(), log_std.tolist(), strict=True):
        # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2
        rows.append([-ls + (math.exp(ls) ** 2 + m * m) / 2 - 0.5 for m, ls in zip(m_row, s_row, strict=True)])
    torch.testing.assert_close(kl_per_dimension(mean, log_std), torch.tensor(rows))
    clamp = 0.5
    expected = sum(sum(max(kl, clamp) for kl in row) for row in rows) / len(rows)
    assert rows[0][0] == 0 and rows[1][1] == 0.125  # two dimensions under the clamp, raised to it
    assert clamped_kl(mean, log_std, clamp).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("min_sample_std", [0.0, 1.0])
def test_loss_terms_by_hand(min_sample_std):
    autoencoder = tiny_autoencoder()
    chunks = torch.randint(0, TINY.vocab_size, (6, TINY.chunk_size), generator=torch.Generator().manual_seed(1))
    terms = autoencoder_loss(
        autoencoder,
        chunks,
        drop_token=0.0,
        drop_latent=0.0,
        kl_clamp=0.5,
        kl_weight=1e-3,
        min_sample_std=min_sample_std,
        generator=torch.Generator().manual_seed(7),
    )
    with torch.no_grad():
        mean, log_std = autoencoder.encode(chunks)
        std = torch.exp(log_std)
        if min_sample_std:
            # the floor must bite on some entries and leave others, or the test could not tell it from no floor
            assert (std < min_sample_std).any() and (std > min_sample_std).any()
            std = torch.where(std < min_sample_std, torch.full_like(std, min_sample_std), std)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        logits = autoencoder.decode(mean + std * eps)
    nll = []
    for row in range(chunks.shape[0]):
        for position in range(TINY.chunk_size):
            scores = logits[row, position].double()
            nll.append(float(scores.logsumexp(0) - scores[chunks[row, position]]))
    ce = sum(nll) / len(nll)
    kl = float(clamped_kl(mean, log_std, 0.5))
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.kl.item() == pytest.approx(kl, rel=1e-6)
    assert terms.loss.item() == pytest.approx(ce * TINY.chunk_size + 1e-3 * kl, rel=1e-5)


def test_drop_token_and_drop_latent(monkeypatch):
    autoencoder = tiny_autoencoder()
    seen = {}
    encode, decode = autoencoder.encode, autoencoder.decode

    def recording_encode(ids):
        seen["ids"] = ids
        return encode(ids)

    def recording_decode(z):
        seen["z"] = z
        return decode(z)

    monkeypatch.setattr(autoencoder, "encode", recording_encode)
    monkeypatch.setattr(autoencoder, "decode", recording_decode)
    chunks = torch.randint(1, TINY.vocab_size, (2000, TINY.chunk_size), generator=torch.Generator().manual_seed(2))
    autoencoder_loss(autoencoder, chunks, drop_token=0.15, drop_latent=0.15, kl_clamp=0.5, kl_weight=1e-3)
    ids, z = seen["ids"], seen["z"]
    dropped = ids == 0
    assert torch.equal(ids[~dropped], chunks[~dropped])  # kept ids unchanged, dropped ones become the pad id 0
    assert 0.13 < dropped.float().mean() < 0.17
    zero = z == 0
    assert 0.13 < zero.float().mean() < 0.17
    with torch.no_grad():  # surviving latent entries are scaled by 1 / (1 - p), so E[z] is unchanged
        mean, log_std = encode(ids)
    posterior_std = torch.exp(log_std)[~zero]
    z_scaled = z[~zero] * 0.85
    assert ((z_scaled - mean[~zero]).abs() / posterior_std).max() < 6  # within the posterior noise


def plain_accuracy(autoencoder: Autoencoder, ids: torch.Tensor, noise: torch.Tensor | None) -> float:
    correct = total = 0
    chunks = ids.reshape(-1, TINY.chunk_size)
    for index in range(chunks.shape[0]):
        mean, _ = autoencoder.encode(chunks[index : index + 1])
        latent = mean if noise is None else mean + noise[index : index + 1]
        logits = autoencoder.decode(latent)[0]
        for position in range(TINY.chunk_size):
            best = max(range(TINY.vocab_size), key=lambda token: float(logits[position, token]))
            correct += best == int(chunks[index, position])
            total += 1
    return correct / total


@torch.no_grad()
def test_reconstruction_accuracy_matches_plain_loop():
    autoencoder = tiny_autoencoder()
    ids = torch.randint(0, TINY.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3))
    clean = reconstruction_accuracy(autoencoder, ids, batch_chunks=7)
    assert clean == plain_accuracy(autoencoder, ids, None)
    noise = 0.3 * torch.randn((30, 1, TINY.latent_size), generator=torch.Generator().manual_seed(4))
    noisy = reconstruction_accuracy(autoencoder, ids, 0.3, torch.Generator().manual_seed(4), batch_chunks=30)
    assert noisy == plain_accuracy(autoencoder, ids, noise)
    with pytest.raises(ValueError, match="whole number of chunks"):
        reconstruction_accuracy(autoencoder, ids[:, :5])


def test_tiny_autoencoder_learns_and_saves(tmp_path):
    # A toy stream with 50 distinct chunks (runs of consecutive ids): chance accuracy is 2%.
    train, heldout = torch.arange(50).repeat(40), torch.arange(3, 50).repeat(2)[:80]
    config = AutoencoderTrainConfig(
        hidden_size=16,
        intermediate_size=32,
        latent_size=8,
        steps=80,
        batch_chunks=64,
        lr=3e-2,
        warmup_steps=5,
        init_std=0.1,
        bf16=False,
        threads=1,  # a tiny model: a second thread only adds synchronisation
        log_interval=20,
        eval_interval=40,
        eval_tokens=400,
    )
    lines = []
    metrics = train_autoencoder(config, train, heldout, 50, tmp_path, log=lines.append)
    assert metrics["accuracy_sigma_0"] > 0.95, lines
    assert metrics["accuracy_sigma_0.3"] > 0.9, lines
    assert metrics["heldout_tokens"] == 80 and metrics["active_dims"] <= 8
    assert any("tokens/s" in line for line in lines) and any("held-out" in line for line in lines)
    loaded = calm_engine.load_autoencoder(tmp_path)
    assert loaded.weights_tied and loaded.config.latent_size == 8 and loaded.config.pad_token_id == 0
    assert reconstruction_accuracy(loaded, heldout) == metrics["accuracy_sigma_0"]
    assert json.loads((tmp_path / TRAINING_FILE).read_text())["metrics"]["steps"] == 80


def test_substitute_random_tokens_statistics():
    chunks = torch.randint(1, 4, (20000, 4), generator=torch.Generator().manual_seed(5))
    assert torch.equal(substitute_random_tokens(chunks, 0.0, 50), chunks)
    out = substitute_random_tokens(chunks, 0.3, 50, torch.Generator().manual_seed(6))
    assert out.shape == chunks.shape and out.dtype == chunks.dtype
    assert int(out.min()) >= 1 and int(out.max()) <= 49  # never the pad id 0, always in the vocabulary
    # Ids 4..49 only come from substitution: 0.3 * 46/49 of the tokens, each id about equally often.
    new = out[out >= 4]
    assert abs(new.numel() / out.numel() - 0.3 * 46 / 49) < 0.01
    counts = torch.bincount(new, minlength=50)[4:].double()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    with pytest.raises(ValueError, match="at least 2"):
        substitute_random_tokens(chunks, 0.1, 1)


def test_random_token_teaches_ids_the_stream_never_shows(tmp_path):
    # The stream uses ids 1..24 only. Held-out chunks are stream chunks with one id replaced by one of 25..48, which
    # only substitution shows the autoencoder.
    train = torch.arange(1, 25).repeat(80)
    chunks = torch.arange(1, 25).repeat(4)[:96].reshape(-1, 4).clone()
    unseen = (torch.arange(24), torch.arange(24) % 4)
    chunks[unseen] = torch.arange(25, 49)
    config = AutoencoderTrainConfig(
        hidden_size=32, intermediate_size=64, latent_size=16, steps=300, batch_chunks=64, lr=3e-2, warmup_steps=5,
        init_std=0.1, bf16=False, threads=1, log_interval=50, eval_interval=300, eval_tokens=96, drop_token=0.0,
    )  # fmt: skip
    unseen_accuracy = {}
    for rate in (0.0, 0.3):
        out = tmp_path / str(rate)
        config_at_rate = dataclasses.replace(config, random_token=rate)
        train_autoencoder(config_at_rate, train, chunks.reshape(-1), 50, out, log=lambda _: None)
        with torch.no_grad():
            loaded = calm_engine.load_autoencoder(out)
            decoded = loaded.decode_ids(loaded.encode(chunks)[0])
        unseen_accuracy[rate] = (decoded[unseen] == chunks[unseen]).float().mean().item()
    assert unseen_accuracy[0.0] == 0.0 and unseen_accuracy[0.3] > 0.25, unseen_accuracy


def test_learning_rate_schedule():
    config = AutoencoderTrainConfig(steps=110, warmup_steps=10, lr=1.0, final_lr_fraction=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.55)
    assert learning_rate(config, 110) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps"),
        ("num_encoder_layers", 3, "even"),
        ("drop_token", 1.0, "probability"),
        ("random_token", -0.1, "probability"),
        ("min_sample_std", -0.1, "min_sample_std"),
        ("lr", 0.0, "lr"),
        ("eval_tokens", 2, "chunk"),
        ("batch_chunks", True, "batch_chunks"),
        ("eval_interval", 150, "multiple of log_interval"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderTrainConfig(**{field: value})


def test_rejects_ids_outside_vocabulary(tmp_path):
    stream = torch.tensor([0, 1, 2, 60] * 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_autoencoder(AutoencoderTrainConfig(steps=1), stream, stream, 50, tmp_path)

"""The energy loss against a plain double loop, and a tiny CALM trained end to end: its loss falls, and the saved
folder loads and generates."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import calm_engine
from calm_engine import SamplingParams
from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.checkpoint import save_autoencoder
from calm_engine.model.config import AutoencoderConfig
from calm_engine.train.calm import CalmTrainConfig, NextChunkProbe, calm_loss, energy_loss, train_calm
from calm_engine.train.loop import SpecialIds
from tests.model_factory import TINY_AE, random_calm_model, randomize_

TINY_TRAIN = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_mlp_layers=1,
    noise_size=8,
    target_samples=20,
    window_tokens=32,
    batch_size=4,
    steps=40,
    lr=3e-3,
    warmup_steps=5,
    log_interval=5,
    eval_interval=20,
    eval_batches=2,
    threads=1,  # tiny shapes gain nothing from a second thread, and CI machines are shared
)


def energy_loss_loop(samples: torch.Tensor, targets: torch.Tensor) -> float:
    """One position's loss, written out term by term with Python floats."""
    x, y = samples.double().tolist(), targets.double().tolist()
    n, m = len(x), len(y)
    fit = sum(math.dist(a, b) for a in x for b in y) / (n * m)
    spread = sum(math.dist(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    return 2 * fit - spread


def test_energy_loss_matches_double_loop():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 3, 5, 6, generator=generator)
    targets = torch.randn(2, 3, 7, 6, generator=generator) * 2 + 0.5
    loss = energy_loss(samples, targets)
    assert loss.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        assert loss[i, j].item() == pytest.approx(energy_loss_loop(samples[i, j], targets[i, j]), rel=1e-5)


def test_energy_loss_prefers_the_target_distribution():
    # The energy score is strictly proper: samples from the targets' own distribution score lower than shifted or
    # too narrow ones (averaged over 200 positions, the gaps are ~30x the estimate's noise).
    generator = torch.Generator().manual_seed(1)
    targets = torch.randn(200, 100, 4, generator=generator)
    same = torch.randn(200, 8, 4, generator=generator)
    shifted = same + 1.0
    narrow = same * 0.3
    loss_same = energy_loss(same, targets).mean()
    assert loss_same < energy_loss(shifted, targets).mean() - 0.2
    assert loss_same < energy_loss(narrow, targets).mean() - 0.1


def test_energy_loss_gradient_is_finite_for_equal_samples():
    # The freshly initialised head outputs the same latent for every noise: the zero distances must not give NaN.
    samples = torch.zeros(3, 8, 4, requires_grad=True)
    energy_loss(samples, torch.randn(3, 10, 4)).sum().backward()
    assert torch.isfinite(samples.grad).all()


def test_energy_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 model samples"):
        energy_loss(torch.zeros(3, 1, 4), torch.zeros(3, 10, 4))
    with pytest.raises(ValueError, match="share leading dims"):
        energy_loss(torch.zeros(3, 8, 4), torch.zeros(2, 10, 4))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="num_samples"):
        CalmTrainConfig(num_samples=1)
    with pytest.raises(ValueError, match="schedule"):
        CalmTrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="multiple of the autoencoder's K=4"):
        CalmTrainConfig(window_tokens=30).model_config(4, 8, 97, SpecialIds())
    with pytest.raises(ValueError, match="probe_weight"):
        CalmTrainConfig(probe_weight=-1.0)


def test_probe_adds_its_weighted_cross_entropy_by_hand():
    model = random_calm_model(seed=4)
    k, vocab = model.config.chunk_size, model.config.vocab_size
    windows = torch.randint(3, vocab, (2, 5 * k), generator=torch.Generator().manual_seed(5))
    probe = randomize_(NextChunkProbe(model.config.hidden_size, model.config.latent_size), seed=6)
    energy = calm_loss(model, windows, 4, 10, torch.Generator().manual_seed(7))
    total = calm_loss(model, windows, 4, 10, torch.Generator().manual_seed(7), probe, 0.5)
    # By hand: chunk i's hidden state, projected and decoded, scored against each token of chunk i+1.
    hidden = model.backbone(model.compress(windows[:, :-k]))
    nll = []
    for b, i in itertools.product(range(2), range(4)):
        logits = model.autoencoder.decode(probe.proj(hidden[b, i])[None, None])[0]  # [K, vocab]
        log_probs = torch.log_softmax(logits.double(), -1)
        nll += [-log_probs[j, windows[b, (i + 1) * k + j]].item() for j in range(k)]
    assert total.item() == pytest.approx(energy.item() + 0.5 * sum(nll) / len(nll), rel=1e-5)
    assert calm_loss(model, windows, 4, 10, torch.Generator().manual_seed(7), probe, 0.0).item() == energy.item()


@pytest.fixture
def autoencoder_dir(tmp_path):
    """A random autoencoder with a sharp posterior (std ~0.05), so the learnable part of the loss dominates."""
    autoencoder = randomize_(Autoencoder(AutoencoderConfig(**{**TINY_AE, "pad_token_id": 0})), seed=3)
    log_std_rows = slice(autoencoder.config.latent_size, None)
    with torch.no_grad():
        autoencoder.encoder.hidden_to_latent.weight[log_std_rows] *= 0.1
        autoencoder.encoder.hidden_to_latent.bias[log_std_rows] = -3.0
    directory = tmp_path / "autoencoder"
    save_autoencoder(autoencoder, directory)
    return directory


@pytest.mark.parametrize("bf16", [False, True])
def test_tiny_calm_learns_and_generates(autoencoder_dir, tmp_path, bf16):
    # A repeating 12-token cycle: each chunk determines the next, so the head can learn to hit the posterior.
    cycle = torch.arange(3, 15)
    stream = cycle.repeat(60)
    logs = []
    config = CalmTrainConfig(**TINY_TRAIN, bf16=bf16)
    metrics = train_calm(
        config, autoencoder_dir, stream, stream[:200], 97, SpecialIds(), tmp_path / "calm", log=logs.append
    )
    first_loss = float(logs[1].split("loss ")[1].split()[0])
    assert metrics["train_loss"] < 0.85 * first_loss, logs
    assert metrics["heldout_loss"] < metrics["history"][0]["heldout_loss"], logs
    assert metrics["tokens_per_second"] > 0 and metrics["parameters"] > 0

    model = calm_engine.load(tmp_path / "calm")
    assert model.config.hidden_size == 32 and model.config.max_position_embeddings == 8
    llm = calm_engine.LLM(tmp_path / "calm")
    outputs = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=8, seed=0))
    assert 0 < len(outputs[0].token_ids) <= 8


def test_probe_trains_but_is_not_saved(autoencoder_dir, tmp_path):
    stream = torch.arange(3, 15).repeat(60)
    logs = []
    plain = train_calm(CalmTrainConfig(**TINY_TRAIN), autoencoder_dir, stream, stream[:200], 97, SpecialIds(),
                       tmp_path / "plain", log=lambda _: None)  # fmt: skip
    probed = train_calm(CalmTrainConfig(**TINY_TRAIN, probe_weight=1.0), autoencoder_dir, stream, stream[:200], 97,
                        SpecialIds(), tmp_path / "probed", log=logs.append)  # fmt: skip
    history = probed["history"]
    assert history[-1]["heldout_probe_ce"] < history[0]["heldout_probe_ce"], logs
    assert "heldout_probe_ce" not in plain and probed["parameters"] == plain["parameters"]
    files = {path.name: path.stat().st_size for path in (tmp_path / "probed").iterdir() if path.is_file()}
    assert files == {path.name: path.stat().st_size for path in (tmp_path / "plain").iterdir() if path.is_file()}
    model = calm_engine.load(tmp_path / "probed")  # the official layout, no probe weights in it
    assert not any("probe" in name for name in model.state_dict())


def test_train_calm_rejects_a_mismatched_vocabulary(autoencoder_dir, tmp_path):
    stream = torch.arange(3, 15).repeat(10)
    with pytest.raises(ValueError, match="vocab_size is 50"):
        train_calm(CalmTrainConfig(**TINY_TRAIN), autoencoder_dir, stream, stream, 50, SpecialIds(), tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_calm(CalmTrainConfig(**TINY_TRAIN), autoencoder_dir, stream + 90, stream, 97, SpecialIds(), tmp_path)

"""The token-level baseline trainer: cross-entropy against a plain computation, learning a repetitive stream far
below log(vocab), and a saved folder that loads and generates."""

from __future__ import annotations

import math

import pytest
import torch

import calm_engine
from calm_engine import SamplingParams
from calm_engine.train.loop import SpecialIds
from calm_engine.train.token_lm import TokenLmTrainConfig, token_lm_loss, train_token_lm
from tests.model_factory import random_token_llama

TINY_TRAIN = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    window_tokens=32,
    batch_size=4,
    steps=60,
    lr=1e-2,
    warmup_steps=5,
    log_interval=10,
    eval_interval=30,
    eval_batches=2,
    threads=1,  # tiny shapes gain nothing from a second thread, and CI machines are shared
)


def test_loss_is_mean_next_token_negative_log_likelihood():
    model = random_token_llama(seed=0)
    windows = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = model.logits(model.hidden_states(windows[:, :-1])).double()
    expected = (
        sum(torch.logsumexp(logits[b, t], -1) - logits[b, t, windows[b, t + 1]] for b in range(2) for t in range(8))
        / 16
    )
    assert token_lm_loss(model, windows).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_token_lm_learns_and_generates(tmp_path, tied):
    stream = torch.arange(3, 15).repeat(60)  # a 12-token cycle: every next token is determined
    logs = []
    config = TokenLmTrainConfig(**TINY_TRAIN, tie_word_embeddings=tied)
    metrics = train_token_lm(config, stream, stream[:200], 97, SpecialIds(), tmp_path / "lm", log=logs.append)
    assert metrics["heldout_loss"] < 0.25 * math.log(97), logs
    assert metrics["heldout_accuracy"] > 0.9, logs

    model = calm_engine.load(tmp_path / "lm")
    assert model.config.tie_word_embeddings is tied
    outputs = calm_engine.LLM(tmp_path / "lm").generate([[3, 4, 5, 6]], SamplingParams(max_tokens=8, seed=0))
    assert outputs[0].token_ids == list(range(7, 15)), logs


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="window_tokens must be >= 2"):
        TokenLmTrainConfig(window_tokens=1)
    with pytest.raises(ValueError, match="multiple of log_interval"):
        TokenLmTrainConfig(log_interval=7, eval_interval=10)
    with pytest.raises(ValueError, match="lr must be"):
        TokenLmTrainConfig(lr=0)


def test_special_ids_outside_the_vocabulary_are_rejected(tmp_path):
    stream = torch.arange(3, 15).repeat(10)
    with pytest.raises(ValueError, match="eos_token_id"):
        train_token_lm(TokenLmTrainConfig(**TINY_TRAIN), stream, stream, 97, SpecialIds(eos_token_id=97), tmp_path)

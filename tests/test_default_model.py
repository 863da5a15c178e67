"""The shipped default model (calm_engine/default_model/): loads without a path, carries its tokenizer, generates."""

from __future__ import annotations

import pytest

import calm_engine
from calm_engine import LLM, SamplingParams
from calm_engine.cli import main
from calm_engine.model.calm import CalmModel
from calm_engine.model.checkpoint import DEFAULT_MODEL_DIR, default_model_path
from calm_engine.model.token_llama import TokenLlama


@pytest.fixture(scope="module")
def default_llm():
    return LLM()


def test_load_without_a_path_gives_the_default_calm_model():
    model = calm_engine.load()
    assert isinstance(model, CalmModel) and model.config.chunk_size == 4
    text = "The history of the city, and thy noble father."
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    baseline = calm_engine.load(default_model_path("token_baseline"))
    assert isinstance(baseline, TokenLlama) and baseline.tokenizer is not None
    assert baseline.config.hidden_size == model.config.hidden_size
    assert baseline.config.num_hidden_layers == model.config.num_hidden_layers


def test_default_model_generates_reproducibly(default_llm):
    params = SamplingParams(temperature=0.5, max_tokens=24, seed=7)
    first, again = default_llm.generate(["The history of the city"] * 2, params)
    assert first.token_ids == again.token_ids and len(first.token_ids) <= 24
    # Text-like: mostly letters and spaces (a random or broken model gives byte soup or one repeated token).
    letters = sum(c.isalpha() or c.isspace() for c in first.text)
    assert letters >= 0.7 * len(first.text) and len(set(first.token_ids)) > 4


def test_calm_generate_streams_the_default_model(capsys):
    assert main(["generate", "--seed", "0", "--max-tokens", "16", "The history of the city"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The history of the city") and len(out) > len("The history of the city") + 1


def test_the_model_card_is_shipped():
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    for topic in ("BrierLM", "training", "tokens"):
        assert topic in card


def test_unknown_default_model_name():
    with pytest.raises(ValueError, match="token_baseline"):
        default_model_path("big")


@pytest.mark.parametrize("text", ["some text", "To be, or not", "The module provides a way", "abcd"])
def test_text_round_trip_adds_nothing_from_the_padding(text):
    """The default autoencoder decodes pad positions as other tokens ("some text" came back as "some text.,"):
    encode_text reports the token count, and decode_text cuts the padding off with it."""
    model = calm_engine.load()
    latents, num_tokens = model.encode_text(text)
    assert num_tokens == len(model.tokenizer.encode(text))
    assert model.decode_text(latents, num_tokens) == text
    with pytest.raises(ValueError, match="num_tokens must be a non-negative integer, got -1"):
        model.decode_text(latents, -1)

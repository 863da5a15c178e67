"""The byte-level BPE tokenizer: special ids, exact round trips, loading through the engine's tokenizer class."""

from __future__ import annotations

import pytest

from calm_engine.tokenizer import HuggingFaceTokenizer
from calm_engine.train.bpe import TOKENIZER_FILE, SpecialTokenIds, train_bpe

TRAIN_TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be: that is the question."] * 5
SAMPLES = [
    "The quick brown fox",
    "  leading spaces,   runs\t\ttabs\nnew lines\r\n\n\n   ",
    "naïve café — 東京 🚀 Ünïcödé never seen in training",
    "<|eos|> text <|bos|>",
    " ",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    special = train_bpe(TRAIN_TEXTS, out, vocab_size=300)
    return special, HuggingFaceTokenizer(out / TOKENIZER_FILE)


def test_special_ids(trained):
    special, tokenizer = trained
    assert special == SpecialTokenIds(pad=0, bos=1, eos=2)
    assert [tokenizer.decode([i]) for i in (0, 1, 2)] == ["<|pad|>", "<|bos|>", "<|eos|>"]
    assert tokenizer.encode("<|eos|>") == [2]
    assert 259 < tokenizer.vocab_size <= 300  # merges were learned, and no more than asked for


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained, text):
    _, tokenizer = trained
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_merges_shorten_trained_text(trained):
    _, tokenizer = trained
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("vocab_size", [258, 0, True, 300.0])
def test_bad_vocab_size(tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TRAIN_TEXTS, tmp_path, vocab_size=vocab_size)

"""Tokenizers: the Llama-3 tiktoken file from ../shared, a Hugging Face tokenizer.json, and the text helpers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import calm_engine
from calm_engine.model.checkpoint import save_calm
from calm_engine.tokenizer import TiktokenTokenizer, TokenizerError, find_tokenizer, load_tokenizer
from tests.conftest import shared_path
from tests.model_factory import random_calm_model

SAMPLES = [
    "The history of the city",
    "  leading spaces, tabs\tand\nnew lines\r\n\n",
    "naïve café — 東京 🚀 1234567 it's we'll",
    "<|begin_of_text|>special<|end_of_text|>",
    "",
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(shared_path("tokenizers", "llama3"), pad_token_id=128256)


def test_llama3_known_ids(llama3):
    assert isinstance(llama3, TiktokenTokenizer)
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("<|begin_of_text|>") == [128000]
    assert llama3.encode("<|end_of_text|>") == [128001]
    assert llama3.vocab_size == 128257
    assert llama3.decode([128256]) == "[PAD]"


@pytest.mark.parametrize("text", SAMPLES)
def test_llama3_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_round_trip_on_documents(llama3):
    lines = shared_path("data", "wikitext103_test_documents.jsonl").read_text().splitlines()
    for line in lines[:5]:
        text = json.loads(line)["text"]
        ids = llama3.encode(text)
        assert 0 < len(ids) < len(text) and llama3.decode(ids) == text


def test_llama3_without_pad(tmp_path):
    tokenizer = load_tokenizer(shared_path("tokenizers", "llama3"))
    assert tokenizer.vocab_size == 128256
    with pytest.raises(TokenizerError, match="not the next id"):
        load_tokenizer(shared_path("tokenizers", "llama3"), pad_token_id=130000)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SAMPLES * 20 + ["the city of history and the history of cities"] * 50, trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_tokenizer_round_trip(hf_tokenizer_dir, text):
    tokenizer = find_tokenizer(hf_tokenizer_dir)
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_json_preferred_and_errors(tmp_path, hf_tokenizer_dir):
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", tmp_path)
    shutil.copy(shared_path("tokenizers", "llama3", "tokenizer.model"), tmp_path)
    assert type(find_tokenizer(tmp_path)).__name__ == "HuggingFaceTokenizer"
    assert find_tokenizer(tmp_path / "nothing") is None
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        find_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x00sentencepiece protobuf")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        find_tokenizer(tmp_path)


def test_text_helpers(tmp_path, hf_tokenizer_dir):
    """encode_text pads the last chunk with the pad id and encodes; decode_text decodes, cuts to the text's tokens,
    drops pads, detokenizes."""
    tokenizer = find_tokenizer(hf_tokenizer_dir)
    model = random_calm_model(seed=21, vocab_size=tokenizer.vocab_size, pad_token_id=0)
    save_calm(model, tmp_path / "calm")
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", tmp_path / "calm")
    model = calm_engine.load(tmp_path / "calm")
    text = "the history of the city"
    ids = tokenizer.encode(text)
    k = model.config.chunk_size
    padded = torch.tensor([ids + [0] * (-len(ids) % k)])
    latents, num_tokens = model.encode_text(text)
    assert torch.equal(latents, model.autoencoder.encode(padded)[0][0]) and num_tokens == len(ids)
    decoded = model.autoencoder.decode_ids(latents[None])[0].tolist()
    assert model.decode_text(latents) == tokenizer.decode([i for i in decoded if i != 0])
    assert model.decode_text(latents, num_tokens) == tokenizer.decode([i for i in decoded[: len(ids)] if i != 0])

    no_tokenizer = calm_engine.load(shared_path("conformance", "calm"))
    with pytest.raises(ValueError, match="no tokenizer"):
        no_tokenizer.encode_text("x")
    with_llama3 = calm_engine.load(shared_path("conformance", "calm"), tokenizer=shared_path("tokenizers", "llama3"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with_llama3.encode_text("Hello world, this is more than the fixture's 512 ids")


def random_ids(tokenizer, rng, count: int) -> list[list[int]]:
    """Id sequences of any ids (lone UTF-8 bytes, special tokens) and of text with multi-byte characters."""
    texts = [tokenizer.encode(t) for t in SAMPLES]
    return texts + [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


@pytest.mark.parametrize("which", ["llama3", "hf", "default"])
def test_token_bytes_decode_as_the_tokenizer(which, llama3, hf_tokenizer_dir):
    """decode(ids) is the UTF-8 text (invalid bytes replaced) of the ids' bytes joined, for any ids."""
    import random

    from calm_engine.model.checkpoint import default_model_path

    tokenizer = {
        "llama3": lambda: llama3,
        "hf": lambda: find_tokenizer(hf_tokenizer_dir),
        "default": lambda: load_tokenizer(default_model_path()),
    }[which]()
    table = tokenizer.token_bytes()
    assert table is not None and len(table) == tokenizer.vocab_size
    for ids in random_ids(tokenizer, random.Random(which), 300):
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids)


def test_token_bytes_only_for_byte_level_decoders(tmp_path, hf_tokenizer_dir):
    from tokenizers import Tokenizer, decoders

    tokenizer = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert find_tokenizer(tmp_path).token_bytes() is None

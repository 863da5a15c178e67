"""ChoiceText: streamed deltas add up to the engine's final text, and nothing sent is ever taken back."""

from __future__ import annotations

import random

import pytest

from calm_engine.model.checkpoint import default_model_path
from calm_engine.serve.text_stream import ChoiceText
from calm_engine.tokenizer import load_tokenizer

K = 4
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module", params=["token_bytes", "decode"])
def table(request, tokenizer):
    """How ChoiceText decodes: through the tokenizer's byte table, or by calling its decode over a window of ids."""
    return tokenizer.token_bytes() if request.param == "token_bytes" else None


def id_streams(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Token id sequences: random ids (some are lone UTF-8 bytes) and text with multi-byte characters."""
    rng = random.Random(seed)
    texts = ["naïve café — 日本語 🙂 done", "Ünïcödé “quotes” and ½ more…", "plain English text, a line\nand another"]
    streams = [tokenizer.encode(t) for t in texts]
    streams += [[rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))] for _ in range(count)]
    return streams


def engine_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != EOS])


def stream(tokenizer, ids: list[int], stop: tuple[str, ...], table) -> tuple[str, str]:
    """Feed `ids` K at a time as the engine reports them, ending where the engine would; (streamed, final text)."""
    text = ChoiceText(tokenizer, stop, skip_ids=[EOS], token_bytes=table)
    streamed = ""
    for end in range(K, len(ids) + K, K):
        so_far = engine_text(tokenizer, ids[:end])
        cuts = [so_far.find(s) for s in stop if s in so_far]
        if cuts or end >= len(ids):  # the engine finishes here: its final text, cut before the first stop string
            final = so_far[: min(cuts)] if cuts else so_far
            streamed += text.finish(final)
            return streamed, final
        streamed += text.add(ids[end - K : end])
        assert final_prefix_holds(tokenizer, ids, stop, streamed)


def final_prefix_holds(tokenizer, ids, stop, streamed) -> bool:
    """What was sent is a prefix of the final text, whatever the engine does later."""
    full = engine_text(tokenizer, ids)
    cuts = [full.find(s) for s in stop if s in full]
    return (full[: min(cuts)] if cuts else full).startswith(streamed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_add_up_to_the_final_text(tokenizer, table, seed):
    for ids in id_streams(tokenizer, 30, seed):
        streamed, final = stream(tokenizer, ids, (), table)
        assert streamed == final == engine_text(tokenizer, ids)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stop_strings_are_never_streamed(tokenizer, table, seed):
    rng = random.Random(seed)
    for ids in id_streams(tokenizer, 30, seed):
        full = engine_text(tokenizer, ids)
        if len(full) < 4:
            continue
        start = rng.randrange(len(full) - 2)
        stop = (full[start : start + rng.randrange(2, 8)], "@@absent@@")  # often spans two steps' text
        streamed, final = stream(tokenizer, ids, stop, table)
        assert streamed == final and stop[0] not in streamed


def test_abort_flushes_what_was_decoded(tokenizer, table):
    ids = tokenizer.encode("an aborted stream keeps its text")
    text = ChoiceText(tokenizer, ("keeps its text plus",), token_bytes=table)
    sent = text.add(ids[:K]) + text.add(ids[K : 2 * K])
    assert sent + text.finish(None) == tokenizer.decode(ids[: 2 * K])

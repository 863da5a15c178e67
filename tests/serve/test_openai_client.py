"""The official openai client against `calm serve`: completions, streaming, n > 1, stop strings, seeds, echo."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.serve.conftest import generate_alone

MODEL = "calm-default"
PROMPTS = ["The history of the city", "To be, or not", "The module provides"]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def stream_texts(client, **request) -> tuple[dict[int, str], dict[int, str], list]:
    """Concatenated text and finish reason of each choice of a streamed completion, and the raw chunks."""
    texts, reasons, chunks = {}, {}, []
    for chunk in client.completions.create(model=MODEL, stream=True, **request):
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in reasons, f"choice {choice.index} finished twice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_completion_equals_generate(client, reference_llm):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, seed=7)
    expected = generate_alone(reference_llm, PROMPTS[0], max_tokens=24, seed=7)
    assert response.object == "text_completion" and response.model == MODEL
    assert [c.text for c in response.choices] == [expected.text]
    assert response.choices[0].finish_reason == expected.finish_reason
    prompt_tokens = len(reference_llm.model.tokenizer.encode(PROMPTS[0]))
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == prompt_tokens + len(expected.token_ids)


def test_streamed_equals_non_streamed(client, reference_llm):
    request = {"prompt": PROMPTS[1], "max_tokens": 40, "seed": 5}
    whole = client.completions.create(model=MODEL, **request)
    texts, reasons, chunks = stream_texts(client, stream_options={"include_usage": True}, **request)
    assert texts == {0: whole.choices[0].text} and reasons == {0: whole.choices[0].finish_reason}
    assert texts[0] == generate_alone(reference_llm, PROMPTS[1], max_tokens=40, seed=5).text
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_n_choices_use_seed_plus_index(client, reference_llm):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=3, max_tokens=16, seed=11)
    assert [c.index for c in response.choices] == list(range(6))
    for choice in response.choices:
        prompt = PROMPTS[choice.index // 3]
        expected = generate_alone(reference_llm, prompt, max_tokens=16, seed=11 + choice.index)
        assert choice.text == expected.text, choice.index
    assert len({c.text for c in response.choices}) > 1  # distinct seeds, distinct samples
    streamed, reasons, _ = stream_texts(client, prompt=PROMPTS[:2], n=3, max_tokens=16, seed=11)
    assert streamed == {c.index: c.text for c in response.choices} and len(reasons) == 6


def test_token_id_prompts_and_echo(client, reference_llm):
    tokenizer = reference_llm.model.tokenizer
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, seed=2, echo=True)
    for choice, prompt_ids in zip(response.choices, ids, strict=True):
        expected = generate_alone(reference_llm, prompt_ids, max_tokens=12, seed=2 + choice.index)
        assert choice.text == tokenizer.decode(prompt_ids) + expected.text
    streamed, _, _ = stream_texts(client, prompt=ids, max_tokens=12, seed=2, echo=True)
    assert streamed == {c.index: c.text for c in response.choices}


def test_stop_strings_cut_the_text(client, reference_llm):
    full = generate_alone(reference_llm, PROMPTS[2], max_tokens=48, seed=9, ignore_eos=True).text
    words = re.findall(r"[A-Za-z]{3,}", full)
    assert len(words) >= 3, full
    stop = words[len(words) // 2]  # a word from the middle of the text
    expected = generate_alone(reference_llm, PROMPTS[2], max_tokens=48, seed=9, ignore_eos=True, stop=(stop,))
    assert expected.finish_reason == "stop" and expected.text == full[: full.index(stop)]
    request = {"prompt": PROMPTS[2], "max_tokens": 48, "seed": 9, "stop": [stop, "@@never@@"]}
    response = client.completions.create(model=MODEL, extra_body={"ignore_eos": True}, **request)
    assert response.choices[0].text == expected.text and response.choices[0].finish_reason == "stop"
    streamed, reasons, _ = stream_texts(client, extra_body={"ignore_eos": True}, **request)
    assert streamed == {0: expected.text} and reasons == {0: "stop"}


@pytest.mark.parametrize("sampler", ["approximate", "exact"])
def test_calm_knobs_below_temperature_one(client, reference_llm, sampler):
    extra = {"num_samples": 24, "sampler": sampler}
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.5, seed=4, extra_body=extra
    )
    expected = generate_alone(reference_llm, PROMPTS[0], max_tokens=8, temperature=0.5, seed=4, **extra)
    assert response.choices[0].text == expected.text


def test_openai_default_max_tokens(client):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], seed=1, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16  # OpenAI's default


def test_models_health_and_log_line(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, seed=1, user="someone")
    line = server.log_line(response.id)
    assert re.search(r"prompt_tokens=5 output_tokens=\d+ first_chunk=[\d.]+ms total=[\d.]+ms finish=\w+", line), line


def test_unseeded_requests_draw_fresh_seeds(client):
    texts = {client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24).choices[0].text for _ in range(3)}
    assert len(texts) > 1

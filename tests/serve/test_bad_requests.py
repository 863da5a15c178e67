"""A catalogue of bad requests: each gets a 4xx in OpenAI's error shape naming the problem, and the server still
serves a normal request right after it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import normal_request

GOOD = {"model": "calm-default", "prompt": "The history of", "max_tokens": 8}
OVER_CONTEXT = [5] * 600  # the default model's context: 128 chunks of K=4 = 512 tokens


def body(**changes) -> bytes:
    fields = {**GOOD, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


# (name, method, path, raw body, status, words the message must contain, param)
CASES = [
    (
        "malformed JSON",
        "POST",
        "/v1/completions",
        b'{"model": "calm-default", "prompt": ',
        400,
        ["not valid JSON"],
        None,
    ),
    ("empty body", "POST", "/v1/completions", b"", 400, ["not valid JSON"], None),
    ("JSON array body", "POST", "/v1/completions", b"[1, 2]", 400, ["JSON object", "array"], None),
    ("non-UTF-8 body", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, ["UTF-8"], None),
    (
        "NaN literal",
        "POST",
        "/v1/completions",
        body(temperature=...)[:-1] + b', "temperature": NaN}',
        400,
        ["NaN"],
        None,
    ),
    ("missing model", "POST", "/v1/completions", body(model=...), 400, ["model", "required"], "model"),
    ("missing prompt", "POST", "/v1/completions", body(prompt=...), 400, ["prompt", "required"], "prompt"),
    ("unknown field", "POST", "/v1/completions", body(temprature=0.5), 400, ["temprature", "not permitted"], None),
    ("max_tokens as string", "POST", "/v1/completions", body(max_tokens="8"), 400, ["max_tokens", "integer"], None),
    ("temperature as string", "POST", "/v1/completions", body(temperature="hot"), 400, ["temperature"], None),
    ("stream as string", "POST", "/v1/completions", body(stream="yes"), 400, ["stream", "boolean"], "stream"),
    ("n as float", "POST", "/v1/completions", body(n=1.5), 400, ["n", "integer"], "n"),
    ("temperature 0", "POST", "/v1/completions", body(temperature=0), 400, ["temperature=0", "greedy"], "temperature"),
    ("temperature < 0", "POST", "/v1/completions", body(temperature=-0.5), 400, ["temperature"], "temperature"),
    ("temperature > 1", "POST", "/v1/completions", body(temperature=1.5), 400, ["temperature", "above 1"], None),
    ("temperature inf", "POST", "/v1/completions", body()[:-1] + b', "temperature": 1e999}', 400, ["finite"], None),
    ("n 0", "POST", "/v1/completions", body(n=0), 400, ["n", "greater than or equal to 1"], "n"),
    ("n huge", "POST", "/v1/completions", body(n=100000), 400, ["n=100000", "more than the server holds"], "n"),
    ("num_samples 0", "POST", "/v1/completions", body(num_samples=0), 400, ["num_samples"], "num_samples"),
    ("num_samples over bound", "POST", "/v1/completions", body(num_samples=10**9), 400, ["num_samples", "bound"], None),
    ("num_samples < 1/T", "POST", "/v1/completions", body(temperature=0.25, num_samples=2), 400, ["num_samples"], None),
    ("sampler unknown", "POST", "/v1/completions", body(sampler="greedy"), 400, ["sampler"], "sampler"),
    ("max_tokens 0", "POST", "/v1/completions", body(max_tokens=0), 400, ["max_tokens"], "max_tokens"),
    ("max_tokens < 0", "POST", "/v1/completions", body(max_tokens=-5), 400, ["max_tokens"], "max_tokens"),
    ("max_tokens over context", "POST", "/v1/completions", body(max_tokens=10**5), 400, ["context", "room"], None),
    ("prompt over context", "POST", "/v1/completions", body(prompt=OVER_CONTEXT), 400, ["600 tokens", "context"], None),
    ("out-of-vocabulary id", "POST", "/v1/completions", body(prompt=[1, 8192]), 400, ["8192", "vocabulary"], "prompt"),
    ("negative id", "POST", "/v1/completions", body(prompt=[1, -1]), 400, ["-1", "vocabulary"], "prompt"),
    ("bad id in 2nd prompt", "POST", "/v1/completions", body(prompt=[[1], [9999]]), 400, ["prompt 1", "9999"], None),
    ("empty prompt list", "POST", "/v1/completions", body(prompt=[]), 400, ["prompt: an empty list"], "prompt"),
    ("empty prompt string", "POST", "/v1/completions", body(prompt=""), 400, ["empty"], "prompt"),
    ("empty token list", "POST", "/v1/completions", body(prompt=[[]]), 400, ["empty list of token ids"], "prompt"),
    ("mixed prompt list", "POST", "/v1/completions", body(prompt=["a", 1]), 400, ["prompt: must be"], "prompt"),
    ("boolean token id", "POST", "/v1/completions", body(prompt=[True]), 400, ["prompt: must be"], "prompt"),
    ("prompt as object", "POST", "/v1/completions", body(prompt={"text": "a"}), 400, ["prompt: must be"], "prompt"),
    ("huge body", "POST", "/v1/completions", body(prompt="a" * (2 << 20)), 413, ["larger than", "limit"], None),
    ("logprobs", "POST", "/v1/completions", body(logprobs=1), 400, ["logprobs", "likelihood-free"], "logprobs"),
    ("logit_bias", "POST", "/v1/completions", body(logit_bias={"1": 5}), 400, ["logit_bias", "no token"], None),
    ("presence_penalty", "POST", "/v1/completions", body(presence_penalty=0.5), 400, ["presence_penalty"], None),
    ("frequency_penalty", "POST", "/v1/completions", body(frequency_penalty=1), 400, ["frequency_penalty"], None),
    ("best_of > n", "POST", "/v1/completions", body(best_of=3), 400, ["best_of=3 > n=1", "likelihood"], "best_of"),
    ("suffix", "POST", "/v1/completions", body(suffix="end"), 400, ["suffix", "infilling"], "suffix"),
    ("top_p < 1", "POST", "/v1/completions", body(top_p=0.5), 400, ["top_p"], "top_p"),
    (
        "stream_options alone",
        "POST",
        "/v1/completions",
        body(stream_options={"include_usage": True}),
        400,
        ["stream"],
        None,
    ),
    ("seed < 0", "POST", "/v1/completions", body(seed=-1), 400, ["seed"], "seed"),
    ("seed >= 2**63", "POST", "/v1/completions", body(seed=2**64), 400, ["seed"], "seed"),
    ("empty stop string", "POST", "/v1/completions", body(stop=[""]), 400, ["stop"], "stop"),
    ("stop as number", "POST", "/v1/completions", body(stop=5), 400, ["stop"], "stop"),
    ("too many stops", "POST", "/v1/completions", body(stop=[f"s{i}" for i in range(17)]), 400, ["at most 16"], "stop"),
    ("unknown model", "POST", "/v1/completions", body(model="gpt-4"), 404, ["gpt-4", "does not exist"], "model"),
    ("unknown model card", "GET", "/v1/models/gpt-4", b"", 404, ["gpt-4", "does not exist"], "model"),
    ("unknown route", "POST", "/v1/chat/completions", body(), 404, ["no route", "/v1/chat/completions"], None),
    ("wrong method", "GET", "/v1/completions", b"", 405, ["not allowed"], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_names_the_problem_and_the_server_survives(server, case):
    name, method, path, raw, status, words, param = case
    headers = {"Content-Type": "application/json"}
    response = httpx.request(method, f"{server.url}{path}", content=raw, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert "errors.pydantic.dev" not in error["message"] and "validation error for" not in error["message"]
    if param is not None:
        assert error["param"] == param
    after = normal_request(server.url)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


def test_rejections_leave_nothing_running(server):
    samples = server.wait_idle()
    assert samples["calm_requests_running"] == samples["calm_requests_waiting"] == samples["calm_kv_slots_used"] == 0
    assert samples['calm_requests_rejected_total{status="400"}'] >= 1

"""Authentication, the bounded waiting queue (503 + Retry-After), client disconnects freeing their slot, and SIGINT,
on a server with one KV slot, one waiting place and an API key from CALM_API_KEY."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import openai
import pytest

from calm_engine.cli import build_parser
from calm_engine.serve.server import config_from_args
from tests.serve.conftest import ServerProcess

KEY = "test-key-0123"
MODEL = "calm-default"
# Tens of ms a step on one 2-core CPU (1,000 head samples: at 200 the C++ step's pools take ~5 ms, too short for the
# step counts checked below): 128 steps outlast every check below; the streams are closed long before.
SLOW = {
    "model": MODEL,
    "prompt": "The history of",
    "max_tokens": 512,
    "temperature": 0.5,
    "num_samples": 1000,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def small_server():
    process = ServerProcess("--max-batch-size", "1", "--max-waiting", "1", env={"CALM_API_KEY": KEY})
    yield process
    assert process.stop(signal.SIGINT) == 0, "".join(process.lines[-20:])  # SIGINT too shuts down gracefully


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_from_flag_or_environment():
    args = build_parser().parse_args(["serve"])
    assert config_from_args(args, {}).api_key is None
    assert config_from_args(args, {"CALM_API_KEY": "env"}).api_key == "env"
    args = build_parser().parse_args(["serve", "--api-key", "flag"])
    assert config_from_args(args, {"CALM_API_KEY": "env"}).api_key == "flag"


@pytest.mark.parametrize(
    "headers", [{}, auth("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}], ids=str
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/models", "/v1/no-such-route"])
def test_v1_needs_the_bearer_key(small_server, headers, path):
    response = httpx.post(f"{small_server.url}{path}", json={"model": MODEL, "prompt": "a"}, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


def test_openai_client_with_and_without_the_key(small_server):
    with openai.OpenAI(base_url=small_server.base_url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=MODEL, prompt="a", max_tokens=4)
    with openai.OpenAI(base_url=small_server.base_url, api_key=KEY, max_retries=0) as client:
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=4, seed=0).choices[0].text
    assert httpx.get(f"{small_server.url}/health").status_code == 200  # open, like /metrics
    assert httpx.get(f"{small_server.url}/metrics").status_code == 200


class Stream:
    """A streamed completion read one event at a time (closing an httpx line iterator closes the response)."""

    def __init__(self, client: httpx.Client, **changes):
        request = client.build_request("POST", "/v1/completions", json={**SLOW, "stream": True, **changes})
        self.response = client.send(request, stream=True)
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()

    def next_event(self) -> str:
        return next(line for line in self._lines if line.startswith("data: "))

    def close(self) -> None:
        self.response.close()


def test_full_queue_gets_503_and_disconnects_free_their_slot(small_server):
    url = small_server.url
    with httpx.Client(base_url=url, headers=auth(), timeout=60) as a, httpx.Client(base_url=url, headers=auth()) as b:
        running = Stream(a, seed=1)
        running.next_event()  # it holds the only slot
        waiting = Stream(b, seed=2)  # accepted: headers sent, queued for the slot
        full = httpx.post(f"{url}/v1/completions", json={**SLOW, "max_tokens": 4}, headers=auth(), timeout=60)
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        before = small_server.metrics()
        assert before["calm_requests_running"] == 1 and before["calm_requests_waiting"] == 1
        assert before["calm_kv_slots_used"] == 1 and before['calm_requests_rejected_total{status="503"}'] >= 1

        running.close()  # the client goes away mid-stream
        aborted = before.get('calm_requests_finished_total{reason="abort"}', 0) + 1
        deadline = time.monotonic() + 10
        while small_server.metrics().get('calm_requests_finished_total{reason="abort"}', 0) < aborted:
            assert time.monotonic() < deadline, "the disconnected request was not aborted"
            time.sleep(0.01)
        after = small_server.metrics()
        # Applied between two steps: the step running when the client left, at most one more while the event
        # loop noticed, and one that may start while this test scrapes.
        assert after["calm_step_seconds_count"] - before["calm_step_seconds_count"] <= 3
        waiting.next_event()  # the freed slot went to the waiting request
        waiting.close()
    samples = small_server.wait_idle()
    assert samples["calm_requests_running"] == samples["calm_requests_waiting"] == samples["calm_kv_slots_used"] == 0
    assert samples['calm_requests_finished_total{reason="abort"}'] >= 2


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_before_the_answer_is_aborted(small_server, stream):
    before = small_server.metrics().get('calm_requests_finished_total{reason="abort"}', 0)
    body = json.dumps({**SLOW, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", int(small_server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + KEY.encode()
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )  # and leave at once, before any answer
    deadline = time.monotonic() + 10
    while small_server.metrics().get('calm_requests_finished_total{reason="abort"}', 0) < before + 1:
        assert time.monotonic() < deadline, "the request of a client that left was not aborted"
        time.sleep(0.01)
    assert small_server.wait_idle()["calm_kv_slots_used"] == 0


def test_non_streaming_disconnect_aborts(small_server):
    before = small_server.metrics().get('calm_requests_finished_total{reason="abort"}', 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request runs
        httpx.post(f"{small_server.url}/v1/completions", json=SLOW, headers=auth(), timeout=0.5)
    deadline = time.monotonic() + 10
    while small_server.metrics().get('calm_requests_finished_total{reason="abort"}', 0) < before + 1:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.01)
    assert small_server.wait_idle()["calm_kv_slots_used"] == 0

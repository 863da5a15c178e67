"""SIGTERM: the server stops accepting, lets running requests finish within --shutdown-timeout, aborts the rest
(their streams end with finish_reason "abort" and [DONE]), and exits 0."""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.serve.conftest import ServerProcess, generate_alone

MODEL = "calm-default"
GRACE_S = 3
SHORT = {"prompt": "To be, or not", "max_tokens": 24, "temperature": 0.5, "num_samples": 50, "seed": 8}
# Over 100 ms a step on a 2-core CPU: its 128 steps outlast the grace period many times over.
LONG = {"prompt": "The history of", "max_tokens": 512, "temperature": 0.5, "num_samples": 1000, "seed": 9}


class Stream:
    def __init__(self, client: httpx.Client, request: dict):
        body = {"model": MODEL, "stream": True, "ignore_eos": True, **request}
        self.response = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
        assert self.response.status_code == 200
        self.events = self.response.iter_lines()
        self.text, self.finish_reason, self.done = "", None, False

    def read(self, until_first_text: bool = False) -> None:
        for line in self.events:
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.done = True
                return
            for choice in json.loads(line[6:])["choices"]:
                self.text += choice["text"]
                self.finish_reason = choice["finish_reason"] or self.finish_reason
            if until_first_text and self.text:
                return


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0(reference_llm):
    server = ServerProcess("--shutdown-timeout", str(GRACE_S))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as a, httpx.Client(base_url=server.url, timeout=60) as b:
            long, short = Stream(a, LONG), Stream(b, SHORT)
            long.read(until_first_text=True)
            signal_sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            short.read()
            long.read()
            long_ended = time.monotonic()
        try:
            late = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=10)
            assert late.status_code == 503
        except httpx.ConnectError:
            pass  # the listening socket is already closed
        status = server.stop(sig=None)  # a second SIGTERM while it exits would kill it (-15), as for any process
    finally:
        server.kill()
    assert status == 0, "".join(server.lines[-20:])
    assert short.done and short.finish_reason == "length"
    expected = generate_alone(
        reference_llm, SHORT["prompt"], ignore_eos=True, **{k: SHORT[k] for k in SHORT if k != "prompt"}
    )
    assert short.text == expected.text  # finished whole, not cut by the shutdown
    assert long.done and long.finish_reason == "abort" and long.text
    assert GRACE_S - 0.5 <= long_ended - signal_sent <= GRACE_S + 10
    assert any("shutting down" in line for line in server.lines)

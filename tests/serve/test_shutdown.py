"""SIGTERM: the server stops accepting, lets running requests finish within --shutdown-timeout, aborts the rest
(their streams end with finish_reason "abort" and [DONE]), and exits 0."""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.serve.conftest import ServerProcess, generate_alone

MODEL = "calm-default"
# Both requests share every step, whose time t LONG's pool sets. SHORT (2 steps) must finish within the grace period
# and LONG (128 steps) must not: 2 t < GRACE_S < 128 t, so 39 ms < t < 2.5 s. The default model's T = 0.5 figures in
# benchmarks/RESULTS.md give about 54 us per sample on a 2-core AMX Xeon and 200 us on a 2-core AVX2 EPYC, so 2,000
# samples take 0.1-0.4 s a step. Under a loaded CI run SHORT's former 6 steps of 1,000 samples outlasted a 3 s grace.
GRACE_S = 5
SHORT = {"prompt": "To be, or not", "max_tokens": 8, "temperature": 0.5, "num_samples": 50, "seed": 8}
LONG = {"prompt": "The history of", "max_tokens": 512, "temperature": 0.5, "num_samples": 2000, "seed": 9}


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
        # No second signal: once uvicorn is done it restores the default handlers, and a second SIGTERM in that
        # window would kill the process instead of letting it finish its graceful exit.
        status = server.stop(sig=None)
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

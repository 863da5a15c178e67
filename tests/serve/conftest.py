"""Servers for the serve tests: `calm serve` subprocesses on a free loopback port, bounded in start and stop time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from calm_engine import LLM, SamplingParams

START_TIMEOUT_S = 120  # import, load and warm up the default model on a busy 2-core machine
STOP_TIMEOUT_S = 60


class ServerProcess:
    """`calm serve --port 0 ARGS` in a subprocess; its output is collected in `lines` (one log line per request)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "calm_engine.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT_S) or self.url is None:
            self.kill()
            pytest.fail(f"calm serve did not start within {START_TIMEOUT_S} s:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}, without the _created series."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits (aborts of disconnected clients land within a step), bounded in time."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            idle = samples["calm_requests_running"] == 0 and samples["calm_requests_waiting"] == 0
            if (idle and samples["calm_kv_slots_used"] == 0) or time.monotonic() > deadline:
                return samples
            time.sleep(0.05)

    def log_line(self, text: str, timeout: float = 10.0) -> str:
        """The first output line containing `text` (the output is read by another thread), bounded in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            time.sleep(0.02)
        pytest.fail(f"no server output line contains {text!r} after {timeout} s")

    def stop(self, sig: int | None = signal.SIGTERM) -> int:
        """Send `sig` (None: none, one was sent already) and wait for the exit status (killed after STOP_TIMEOUT_S)."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"calm serve did not exit within {STOP_TIMEOUT_S} s of signal {sig}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="session")
def server():
    """The shared server: the default model, 64 slots, no API key."""
    process = ServerProcess()
    yield process
    assert process.stop() == 0, "".join(process.lines[-20:])


@pytest.fixture(scope="session")
def reference_llm():
    """The same default model in this process: what the server must reproduce, request by request."""
    return LLM()


def generate_alone(llm: LLM, prompt, **params):
    """One request run alone through LLM.generate: what a seeded server request must equal. On one thread, as the
    server's engine on a 2-core CPU (`calm serve --threads`); it is also several times faster than two threads
    beside a running server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return llm.generate([prompt], SamplingParams(**params))[0]
    finally:
        torch.set_num_threads(threads)


def normal_request(url: str, **extra) -> httpx.Response:
    body = {"model": "calm-default", "prompt": "The history of", "max_tokens": 8, "seed": 3, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)

"""A lean load generator for `calm serve`: streamed completions over keep-alive HTTP/1.1 connections, parsed in
asyncio protocol callbacks (no coroutine per event, no JSON per event), so that the client takes as little as
possible of the CPU it shares with the server on a small machine. benchmarks/serve_load.py uses it.

The stream's bytes are kept and parsed only after the run (`StreamResult.texts`), so a benchmark can check what
it received without paying for the check while it measures.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

HEAD_END = b"\r\n\r\n"
CRLF = b"\r\n"


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request was written
    event_times: list[float] = field(default_factory=list)  # arrival of each chunk of the body holding text
    body: list[bytes] = field(default_factory=list)  # the body's chunks, as received

    @property
    def first_s(self) -> float:
        return self.event_times[0] - self.sent

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.event_times, self.event_times[1:], strict=False)]

    def events(self) -> list[dict]:
        """The `data:` events as JSON, without the closing [DONE] (which it checks is there, last)."""
        text = b"".join(self.body).decode("utf-8")
        raw = [e for e in text.split("\n\n") if e]
        if not raw or raw[-1] != "data: [DONE]":
            raise RuntimeError(f"the stream did not end with data: [DONE]: {raw[-1:]!r}")
        if not all(e.startswith("data: ") for e in raw):
            raise RuntimeError("an event without `data: `")
        return [json.loads(e[6:]) for e in raw[:-1]]

    def texts(self) -> tuple[dict[int, str], dict[int, str], dict | None]:
        """(text by choice index, finish reason by choice index, usage or None)."""
        texts, reasons, usage = {}, {}, None
        for event in self.events():
            if event.get("usage") is not None:
                usage = event["usage"]
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["finish_reason"] is not None:
                    reasons[choice["index"]] = choice["finish_reason"]
        return texts, reasons, usage


class SSEConnection(asyncio.Protocol):
    """One keep-alive connection, one streamed request at a time. The response must be 200 and chunked."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._result: StreamResult | None = None
        self._done: asyncio.Future | None = None
        self._in_head = True

    @classmethod
    async def open(cls, host: str, port: int) -> SSEConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, host, port)
        return connection

    async def stream(self, host: str, request: dict) -> StreamResult:
        body = json.dumps({**request, "stream": True, "stream_options": {"include_usage": True}}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self._result = StreamResult(time.perf_counter())
        self._done = asyncio.get_running_loop().create_future()
        self._in_head = True
        self.transport.write(head + body)
        return await self._done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---- protocol callbacks -----------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, error) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"the server closed the connection mid-response ({error})"))

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():
            raise RuntimeError(f"bytes outside a response: {bytes(data[:80])!r}")
        self._buffer += data
        try:
            self._parse(time.perf_counter())
        except Exception as error:  # noqa: BLE001 - a malformed response fails the request that waits for it
            self._done.set_exception(error)
            self.transport.close()

    def _parse(self, now: float) -> None:
        buffer = self._buffer
        if self._in_head:
            end = buffer.find(HEAD_END)
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            if not head.startswith(b"http/1.1 200 "):
                raise RuntimeError(f"the server answered {head.split(CRLF, 1)[0]!r}")
            if b"\r\ntransfer-encoding: chunked" not in head:
                raise RuntimeError("the streamed response is not chunked")
            del buffer[: end + len(HEAD_END)]
            self._in_head = False
        start, text = 0, False
        while True:  # whole chunks only: a chunk's size line, its bytes and their CRLF
            end = buffer.find(CRLF, start)
            if end < 0:
                break
            size = int(buffer[start:end], 16)
            stop = end + 2 + size + 2
            if len(buffer) < stop:
                break
            if size == 0:  # the last chunk (no trailers follow from this server)
                if text:
                    self._result.event_times.append(now)
                del buffer[:stop]
                self._done.set_result(self._result)
                return
            payload = bytes(buffer[end + 2 : stop - 2])
            self._result.body.append(payload)
            text = text or b'"choices":[{' in payload
            start = stop
        del buffer[:start]
        if text:
            self._result.event_times.append(now)

"""A lean load generator for `calm serve`: streamed completions over keep-alive HTTP/1.1 connections.

While a response streams, the client only keeps each read's bytes and arrival time and watches for the end of the
chunked body; the HTTP framing and the events are parsed after the run (`StreamResult`). So the client takes as
little as possible of the CPU that it shares with the server on a small machine (benchmarks/serve_load.py).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from dataclasses import dataclass, field

HEAD_END = b"\r\n\r\n"
CRLF = b"\r\n"
BODY_END = b"\r\n0\r\n\r\n"  # a chunked body's last chunk after the CRLF that closes the one before it


@dataclass
class StreamResult:
    """One streamed response as received: the bytes of each read and when it arrived."""

    sent: float  # perf_counter when the request was written
    reads: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def chunks(self) -> list[tuple[bytes, float]]:
        """The body's chunks and the arrival time of each chunk's last byte; checks the status and the framing."""
        data = b"".join(self.reads)
        head_end = data.find(HEAD_END)
        head = data[:head_end].lower()
        if not head.startswith(b"http/1.1 200 ") or b"\r\ntransfer-encoding: chunked" not in head:
            raise RuntimeError(f"not a chunked 200 answer: {data[:200]!r}")
        ends, total = [], 0  # the offset just past each read
        for read in self.reads:
            total += len(read)
            ends.append(total)
        chunks, at = [], head_end + len(HEAD_END)
        while True:
            line_end = data.index(CRLF, at)
            size = int(data[at:line_end], 16)
            start, stop = line_end + 2, line_end + 2 + size
            if data[stop : stop + 2] != CRLF:
                raise RuntimeError("a chunk without its CRLF")
            if size == 0:
                if stop + 2 != len(data):
                    raise RuntimeError("bytes after the last chunk")
                return chunks
            chunks.append((data[start:stop], self.times[bisect.bisect_left(ends, stop)]))
            at = stop + 2

    def event_times(self) -> list[float]:
        """When each chunk holding text (a choice's event) arrived; events that arrived together count once."""
        times = [t for payload, t in self.chunks() if b'"choices":[{' in payload]
        return sorted(set(times))

    @property
    def first_s(self) -> float:
        return self.event_times()[0] - self.sent

    @property
    def gaps_s(self) -> list[float]:
        times = self.event_times()
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def events(self) -> list[dict]:
        """The `data:` events as JSON, without the closing [DONE] (which it checks is there, last)."""
        text = b"".join(payload for payload, _ in self.chunks()).decode("utf-8")
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
    """One keep-alive connection, one streamed request at a time. An answer other than 200 fails the request and
    closes the connection (its body is not read)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self._result: StreamResult | None = None
        self._done: asyncio.Future | None = None
        self._head_checked = False
        self._tail = b""

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
        self._head_checked, self._tail = False, b""
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
        result = self._result
        if self._done is None or self._done.done():
            raise RuntimeError(f"bytes outside a response: {data[:80]!r}")
        result.reads.append(data)
        result.times.append(time.perf_counter())
        if not self._head_checked and not self._check_head(b"".join(result.reads)):
            return
        tail = (self._tail + data)[-len(BODY_END) :]
        self._tail = tail
        if tail == BODY_END:
            self._done.set_result(result)

    def _check_head(self, received: bytes) -> bool:
        """Once the head is in: True for a 200 (the body follows), else the request fails."""
        if HEAD_END not in received:
            return False
        self._head_checked = True
        if received.startswith(b"HTTP/1.1 200 "):
            return True
        self._done.set_exception(RuntimeError(f"the server answered {received.split(CRLF, 1)[0]!r}"))
        self.transport.close()
        return False

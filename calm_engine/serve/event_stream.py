"""EventStream: a text/event-stream response sent straight through ASGI, one body message per batch of events.

Starlette's StreamingResponse runs the body and a disconnect listener as two tasks of an anyio task group and ends
the body with a message of its own (one more socket write). Here the body runs in the request's own task, a small
watcher task cancels it when the client leaves, and the batch that ends the stream also ends the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
END = {"type": "http.response.body", "body": b"", "more_body": False}


class EventStream:
    """An ASGI response. `events` yields (bytes of one or more events, last); the body ends after the batch marked
    last, or when `events` ends. `on_close` runs once however the response ends: finished, failed, or the client
    gone (its task is then cancelled wherever it waits, and the response ends quietly)."""

    def __init__(self, events: AsyncIterator[tuple[bytes, bool]], on_close: Callable[[], None]):
        self._events = events
        self._on_close = on_close
        self._streaming = True
        self._client_gone = False

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive, asyncio.current_task()))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            last = False
            async for data, last in self._events:
                await send({"type": "http.response.body", "body": data, "more_body": not last})
                if last:
                    break
            if not last:
                await send(END)
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
        finally:
            self._streaming = False
            watcher.cancel()
            try:
                await self._events.aclose()
            finally:
                self._on_close()

    async def _watch(self, receive, task: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._streaming:  # after the last batch the server reports a disconnect too: not the client's doing
            self._client_gone = True
            task.cancel()

"""The FastAPI application: routes, body limits, error handlers and the engine loop's lifetime.

POST /v1/completions · GET /v1/models, /v1/models/{id} · GET /health (200 while serving, else 503) · GET /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from calm_engine.serve import protocol
from calm_engine.serve.auth import APIKeyMiddleware
from calm_engine.serve.completions import CompletionService
from calm_engine.serve.config import ServeConfig
from calm_engine.serve.engine_loop import EngineLoop
from calm_engine.serve.errors import APIError, bad_request_from, install_error_handlers
from calm_engine.serve.metrics import ServerMetrics

# A body over the limit but under this is read to its end before the 413, so that the client, which sends its whole
# body before reading the answer, gets the 413 rather than a reset connection; a larger one is answered at once.
DRAIN_LIMIT = 64 << 20


def create_app(loop: EngineLoop, tokenizer, config: ServeConfig, metrics: ServerMetrics, on_ready=None) -> FastAPI:
    """An app serving `loop`'s engine; the loop's thread starts and stops with the app. on_ready() after startup."""
    service = CompletionService(loop, tokenizer, config, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start(asyncio.get_running_loop())
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(loop.stop)

    app = FastAPI(title="calm-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app, on_error=metrics.count_rejected)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, on_reject=metrics.count_rejected)

    async def completions(http: Request):
        data = await read_json_body(http, config.max_body_bytes)
        try:
            body = protocol.CompletionRequest.model_validate(data)
        except ValidationError as error:
            raise bad_request_from(error) from None
        return await service.create(body, http)

    # A plain Starlette route: the endpoint reads and validates its own body, FastAPI's parameter handling would
    # only add work to every request, and a streamed answer (EventStream) is an ASGI app rather than a Response.
    app.add_route("/v1/completions", completions, methods=["POST"])

    def card() -> dict:
        return protocol.model_card(config.model_id, created, service.max_model_len)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_id:
            message = f"the model {model_id!r} does not exist: this server serves {config.model_id!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        return card()

    @app.get("/health")
    async def health():
        if loop.accepting:
            return {"status": "ok"}
        return JSONResponse({"status": loop.failure or "shutting down"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    metrics.watch(loop.stats)
    return app


async def read_json_body(http: Request, limit: int) -> dict:
    """The body as a JSON object: 413 over `limit` bytes, 400 for non-UTF-8, malformed JSON, NaN or a non-object."""
    declared = http.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-size)")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > limit:
        raise too_large
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not UTF-8: invalid byte at offset {error.start}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise APIError(400, f"the request body must be a JSON object, got a JSON {kind}")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")

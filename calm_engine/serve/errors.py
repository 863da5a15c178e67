"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the handlers that produce them."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("calm_engine.serve")

# OpenAI's `type` for each status this server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client: status, a message naming the problem, the offending parameter if any."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message from pydantic's error list, and the first offending field: `field: problem (got ...)`."""
    parts, first_param = [], None
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        first_param = first_param or location or None
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        shown = f"{location}: {message}" if location else message
        if error.get("type") not in ("missing", "extra_forbidden") and "input" in error:
            got = repr(error["input"])
            shown += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        parts.append(shown)
    return "; ".join(parts), first_param


def bad_request_from(error: ValidationError) -> APIError:
    message, param = describe_validation_error(error.errors(include_url=False))
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """on_error(status): called for every error answered (the metrics count rejected requests by status)."""

    def answer(status: int, message: str, **fields) -> JSONResponse:
        if on_error is not None:
            on_error(status)
        return error_response(status, message, **fields)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return answer(error.status, error.message, param=error.param, code=error.code, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /v1/models and POST /v1/completions"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return answer(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        # Never pydantic's raw dump: a 400 with one readable line per problem, as vLLM answers.
        message, param = describe_validation_error(list(error.errors()))
        return answer(400, message, param=param)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return answer(500, f"internal server error ({type(error).__name__}); see the server log")

"""API-key authentication: with a key set, every /v1/* request needs `Authorization: Bearer KEY`, else 401.

/health and /metrics stay open, as in vLLM, for load balancers and scrapers. An ASGI middleware, so that it answers
before any body is read and before routing (an unknown /v1 path without the key is a 401, not a 404).
"""

from __future__ import annotations

import hmac

from calm_engine.serve.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        if self._on_reject is not None:
            self._on_reject(401)
        reason = "no Authorization header" if not given else "the API key is not the server's"
        message = f"{reason}: send 'Authorization: Bearer <key>' with the key the server was started with"
        response = error_response(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="calm"'}
        )
        await response(scope, receive, send)


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")

"""HTTP errors in OpenAI's shape, and the one place the engine's typed errors become status codes."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from cairn.engine.engine import QueueFullError
from cairn.errors import CapacityError, ContextLengthError, EngineClosedError, UserError
from cairn.serve.protocol import error_body

log = logging.getLogger("cairn.serve")


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def from_submit(e: Exception) -> APIError:
    """A request the engine refused at submit: 429 when its queue is full, else 400 (the user's to fix)."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, CapacityError):
        return from_generation(e, "")
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else e.code
    return APIError(400, str(e), param=e.param, code=code)


def from_generation(e: Exception, request_id: str) -> APIError:
    """A request that failed while generating (the error an engine event carries): 503 with Retry-After when
    capacity is gone or the server is shutting down, 400 for the user's mistakes, else a logged 500."""
    if isinstance(e, CapacityError):
        return APIError(503, str(e), "server_error", code="insufficient_capacity", headers={"Retry-After": "5"})
    if isinstance(e, EngineClosedError):
        return APIError(503, "the server is shutting down; retry on another replica", "server_error",
                        code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, UserError):
        return APIError(400, str(e), param=e.param, code=e.code)
    log.error("request %s: generation failed", request_id, exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"generation failed ({type(e).__name__}); request {request_id}, the server log has the "
                    "details", "server_error", code="generation_failed")

"""What the server does around every request: an id, a body size limit, the request counter, one log line, and a
logged 500 in OpenAI's shape for anything unexpected.

Log lines go to the `cairn.serve` logger: one per request (id, method, route, model, status, tokens, latency; at
debug level for /health and /metrics probes) and one with the traceback for every 5xx that an exception caused.
Headers are never logged, so neither is an API key.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cairn.serve.metrics import Metrics
from cairn.serve.protocol import error_body

log = logging.getLogger("cairn.serve")

SCOPE_KEY = "cairn.request"
"""Where a request's RequestInfo lives in its ASGI scope (handlers fill in the model and the tokens)."""


@dataclass
class RequestInfo:
    """One request as its log line reports it."""

    id: str
    method: str
    route: str
    model: str | None = None
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    answered_by: str | None = None
    """The real model that produced the response (sent as the x-cairn-model header)."""
    router: str | None = None
    """The router's name when the request asked for one."""
    route_seconds: float = 0.0
    """Seconds the router spent deciding."""
    answer_started: float | None = None
    """perf_counter() when the answering model started on it."""
    attempts: list = field(default_factory=list)
    """Answers a cascade dropped: model, prompt_tokens, completion_tokens, seconds."""


def request_info(scope: Scope) -> RequestInfo:
    return scope[SCOPE_KEY]


class Observe:
    """ASGI middleware (outermost of the app's own): see the module docstring. Bodies over `max_body_bytes`, by
    Content-Length or by what actually arrives, are answered 413 before the app sees them."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, route_of: Callable[[Scope], str], max_body_bytes: int):
        self.app, self.metrics, self.route_of, self.max_body_bytes = app, metrics, route_of, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = RequestInfo(uuid.uuid4().hex, scope["method"], self.route_of(scope))
        scope[SCOPE_KEY] = info
        started = time.perf_counter()
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                info.status = message["status"]
                extra = [(b"x-request-id", info.id.encode())]
                if info.answered_by is not None:
                    extra.append((b"x-cairn-model", info.answered_by.encode()))
                if info.router is not None:
                    extra.append((b"x-cairn-router", info.router.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await _send_error(send_with_id, 413, f"request body is larger than the server's limit of "
                                  f"{self.max_body_bytes} bytes (cairn serve --max-body-bytes)", "request_too_large")
            elif body is not _DISCONNECTED:
                await self.app(scope, _replay(body, receive), send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", info.id, info.method, info.route)
            if not response_started:
                await _send_error(send_with_id, 500, f"internal error (request {info.id}); the server log has the "
                                  "details", "internal_error", type_="server_error")
            info.status = info.status or 500
        finally:
            info.latency_ms = (time.perf_counter() - started) * 1000
            self.metrics.requests.labels(info.route, str(info.status or 499)).inc()
            if info.router is not None:
                self.metrics.record_route(info, time.perf_counter())
            _log_request(info)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None | object:
        """The whole body; None when it is over the limit; _DISCONNECTED when the client left first."""
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _DISCONNECTED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_DISCONNECTED = object()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then passes through (disconnect notices)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, status: int, message: str, code: str, type_: str = "invalid_request_error"):
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_PROBES = frozenset({"/health", "/metrics"})
"""Routes polled by load balancers and scrapers: logged at debug level, not to drown the requests."""


def _log_request(info: RequestInfo) -> None:
    if info.route in _PROBES:
        level = logging.DEBUG
    else:
        level = logging.WARNING if (info.status or 0) >= 500 else logging.INFO
    log.log(level, "%s %s %s status=%s model=%s prompt_tokens=%d completion_tokens=%d latency_ms=%.1f",
            info.id, info.method, info.route, info.status, info.model, info.prompt_tokens, info.completion_tokens,
            info.latency_ms, extra={"request": asdict(info)})


class JSONLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, a request's fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "request", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    """Send cairn's log records to stderr at `level`, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONLines() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cairn")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

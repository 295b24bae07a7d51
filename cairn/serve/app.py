"""OpenAI-compatible HTTP API over one or more loaded models (LLM objects: local, or pool-backed).

Every error is OpenAI's shape {"error": {message, type, param, code}} with a 4xx status for the client's
mistakes; nothing a client sends produces a traceback. A client that disconnects mid-stream cancels its
request, which frees its KV slot at the next engine step. /openapi.json describes every request and response."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from cairn.config import SamplingParams
from cairn.engine.api import LLM, RequestHandle
from cairn.engine.engine import QueueFullError
from cairn.errors import UserError
from cairn.route.config import RouterSpec
from cairn.serve import responses as out
from cairn.serve import routed
from cairn.serve.errors import APIError, from_submit
from cairn.serve.metrics import Metrics
from cairn.serve.observe import Observe, request_info
from cairn.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_body,
    openapi_schemas,
)

log = logging.getLogger("cairn.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Default limit on a request body (cairn serve --max-body-bytes)."""


def create_app(models: dict[str, LLM] | None = None, *, loader: Callable[[], dict[str, LLM]] | None = None,
               routers: list[RouterSpec] = (), api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving `models` (name -> LLM), or the ones `loader` returns, loaded in the background while
    /health answers 503; each of `routers` answers to its own names (serve/names.py) by picking one of the models
    (serve/routed.py). Request bodies over `max_body_bytes` are refused with 413."""
    state = {"models": dict(models or {}), "ready": models is not None, "load_error": None, "routes": {}}
    if models is not None:
        state["routes"] = routed.build(list(routers), state["models"])
    metrics = Metrics(lambda: {n: {**m.stats(), **m.kv_stats()} for n, m in state["models"].items()})
    app = FastAPI(title="cairn", version="0.1.0", summary="OpenAI-compatible API over locally served models")
    app.state.cairn = state
    app.add_middleware(Observe, metrics=metrics, route_of=lambda scope: _route_of(app, scope),
                       max_body_bytes=max_body_bytes)
    app.openapi = lambda: _openapi(app)
    if loader is not None:
        _load_in_background(state, loader, list(routers))
    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def model(name: str) -> LLM | routed.Route:
        """The served model or the router answering to `name`."""
        if not state["ready"]:
            if state["load_error"]:
                raise APIError(503, f"model loading failed: {state['load_error']}", "server_error")
            raise APIError(503, "models are still loading; retry shortly", "server_error", headers={"Retry-After": "1"})
        if name in state["routes"]:
            return state["routes"][name]
        if name not in state["models"]:
            raise APIError(404, f"model {name!r} does not exist; available: "
                           f"{', '.join([*state['models'], *state['routes']])}", "not_found_error", "model",
                           "model_not_found")
        return state["models"][name]

    async def answer(requested: str, prepare, params: SamplingParams, n: int, seed: int | None,
                     info) -> tuple[str, LLM, list[list[int]], list]:
        """Which model answers (the requested one, or the one its router picks), the prompts' token ids for it and
        the request's handles. prepare(llm) gives the prompts' token ids for that model and the prompt's text."""
        target = model(requested)
        if isinstance(target, routed.Route):
            name, llm, ids, handles = await routed.dispatch(target, requested, state["models"], prepare, params, n,
                                                            seed, _submit, info)
        else:
            name, llm = requested, target
            ids, _ = await asyncio.to_thread(prepare, llm)
            handles = _submit(llm, ids, params, n, seed)
        info.model = info.answered_by = name
        return name, llm, ids, handles

    @app.get("/health")
    async def health():
        if state["ready"]:
            return {"status": "ok", "models": list(state["models"])}
        return JSONResponse({"status": "loading" if not state["load_error"] else "failed",
                             "error": state["load_error"]}, 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", openapi_extra=_doc(None, "ModelList"))
    async def list_models(request: Request):
        authorize(request)
        now = int(time.time())
        return ModelList(data=[ModelCard(id=n, created=now) for n in state["models"]]
                         + [ModelCard(id=n, created=now, owned_by=routed.ROUTER_OWNER) for n in state["routes"]])

    @app.post("/v1/chat/completions", openapi_extra=_doc("ChatCompletionRequest", "ChatCompletion",
                                                          "ChatCompletionChunk"))
    async def chat_completions(request: Request):
        info = request_info(request.scope)
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        info.model = body.model
        model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        messages = [m.for_template() for m in body.messages]
        params = _params(body, body.max_completion_tokens or body.max_tokens,
                         (body.top_logprobs or 0) if body.logprobs else None)

        def prepare(llm):
            return [llm.render_chat(messages)], "\n".join(m["content"] for m in messages)

        name, llm, _, handles = await answer(body.model, prepare, params, body.n, body.seed, info)
        base = {"id": f"chatcmpl-{info.id}", "created": int(time.time()), "model": name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return out.sse(out.chat_stream(llm, base, handles, info, metrics, usage, body.n), info)
        outs = await out.gather(handles, info, metrics)
        return _counted(info, out.chat_response(llm, base, handles, outs, body.logprobs, body.n))

    @app.post("/v1/completions", openapi_extra=_doc("CompletionRequest", "TextCompletion", "TextCompletion"))
    async def completions(request: Request):
        info = request_info(request.scope)
        authorize(request)
        body = await _parse(request, CompletionRequest)
        info.model = body.model
        model(body.model)
        prompts = _prompt_list(body.prompt)
        group = _best_of(body)
        logprobs = body.logprobs if group == body.n else (body.logprobs or 0)  # best_of ranks by logprob
        params = _params(body, 16 if body.max_tokens is None else body.max_tokens, logprobs)

        def prepare(llm):
            ids = [llm.encode_prompt(x) for x in prompts]
            return ids, "\n".join(x for x in prompts if isinstance(x, str))  # rules read text prompts only

        name, llm, ids, handles = await answer(body.model, prepare, params, group, body.seed, info)
        try:
            echoes = await _echoes(llm, prompts, ids, body)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        base = {"id": f"cmpl-{info.id}", "created": int(time.time()), "model": name}
        want_lp = body.logprobs is not None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return out.sse(out.completion_stream(llm, base, handles, info, metrics, usage, echoes, want_lp, body.n),
                           info)
        outs = await out.gather(handles, info, metrics)
        return _counted(info, out.completion_response(llm, base, handles, outs, echoes, want_lp, body.n, group))

    return app


def _load_in_background(state: dict, loader: Callable[[], dict[str, LLM]], routers: list[RouterSpec]) -> None:
    def load():
        try:
            models = loader()
            state["routes"] = routed.build(routers, models)
            state["models"] = models
            state["ready"] = True
        except UserError as e:  # reported by /health and every request
            log.error("loading the models failed: %s", e)
            state["load_error"] = f"{type(e).__name__}: {e}"
        except Exception as e:
            log.exception("loading the models failed")
            state["load_error"] = f"{type(e).__name__}: {e}"

    threading.Thread(target=load, name="cairn-load", daemon=True).start()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape. Unexpected exceptions are turned into a logged 500 by Observe."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(UserError)
    async def _user_error(_: Request, e: UserError):
        return from_submit(e).response()

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, e: QueueFullError):
        return from_submit(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        return _validation_error(e.errors()).response()


def _route_of(app: FastAPI, scope: Scope) -> str:
    """The request's route template, or "other": the metrics label must not take values a client chooses."""
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return route.path
    return "other"


def _doc(request_schema: str | None, response_schema: str, stream_schema: str | None = None) -> dict:
    """An operation's request body and responses for /openapi.json (the routes read the body themselves, so
    that every failure is a 400 in OpenAI's shape, never FastAPI's 422)."""
    def ref(name):
        return {"schema": {"$ref": f"#/components/schemas/{name}"}}

    ok = {"application/json": ref(response_schema)}
    if stream_schema:
        ok["text/event-stream"] = ref(stream_schema)
    errors = {"400": "invalid request (the param names the field)", "401": "missing or wrong API key",
              "404": "no such model", "413": "request body too large", "429": "too many requests waiting",
              "500": "internal error", "503": "models loading, or capacity lost"}
    doc = {"responses": {"200": {"description": "OK (with stream: true, server-sent events of chunks)", "content": ok},
                         **{k: {"description": v, "content": {"application/json": ref("ErrorResponse")}}
                            for k, v in errors.items()}}}
    if request_schema:
        doc["requestBody"] = {"required": True, "content": {"application/json": ref(request_schema)}}
    return doc


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
        app.openapi_schema = schema
    return app.openapi_schema


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _param(loc) -> str | None:
    """A pydantic error location as OpenAI names a param: messages[0].content (union member tags dropped)."""
    parts = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in _TYPE_TAGS or "[" in x or "-" in x:  # which member of a union failed: not a field
            break
        else:
            parts.append(("." if parts else "") + x)
    return "".join(parts) or None


def _validation_error(errors: list) -> APIError:
    first = errors[0] if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    param = _param(loc)
    msg = first.get("msg", "invalid request")
    if param == "prompt" and len(loc) > 1:
        msg = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


async def _parse(request: Request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


def _params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    stop = body.stop
    stop = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
    if len(stop) > 16:
        raise APIError(400, "stop: at most 16 stop strings", param="stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            min_p=body.min_p or 0.0,
            stop=stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            logit_bias=tuple((int(t), float(b)) for t, b in (body.logit_bias or {}).items()),
        )
    except UserError as e:
        raise APIError(400, str(e), param=e.param) from None


def _prompt_list(prompt) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: is empty", param="prompt")
    return list(prompt)


def _best_of(body: CompletionRequest) -> int:
    """How many to generate per prompt: n, or best_of (of which the best n are returned)."""
    if body.best_of is None or body.best_of == body.n:
        return body.n
    if body.best_of < body.n:
        raise APIError(400, f"best_of: must be at least n ({body.n}), got {body.best_of}", param="best_of")
    if body.stream:
        raise APIError(400, "best_of: cannot be larger than n when streaming (the best are known only at the end)",
                       param="best_of")
    return body.best_of


async def _echoes(llm: LLM, prompts, ids: list[list[int]], body: CompletionRequest) -> list[tuple[str, list]]:
    """Per prompt: the text echoed before its completions, and (with logprobs) its tokens' (id, logprob) entries."""
    if not body.echo:
        return [("", [])] * len(prompts)
    result = []
    for prompt, tokens in zip(prompts, ids):
        text = prompt if isinstance(prompt, str) else llm.tokenizer.decode(tokens, skip_special_tokens=False)
        entries = []
        if body.logprobs is not None:
            entries = list(zip(tokens, await asyncio.to_thread(llm.prompt_logprobs, tokens, body.logprobs)))
        result.append((text, entries))
    return result


def _submit(llm: LLM, prompts: list[list[int]], params: SamplingParams, n: int, seed: int | None) -> list[RequestHandle]:
    """n requests per prompt, prompt-major; choice i of a prompt draws with seed + i. All or none are queued."""
    handles: list[RequestHandle] = []
    try:
        for ids in prompts:
            for i in range(n):
                p = params if seed is None or n == 1 else replace(params, seed=seed + i)
                handles.append(llm.submit(ids, p))
    except (UserError, QueueFullError) as e:
        for h in handles:
            h.cancel()
        raise from_submit(e) from None
    return handles


def _counted(info, response):
    info.prompt_tokens, info.completion_tokens = response.usage.prompt_tokens, response.usage.completion_tokens
    return response

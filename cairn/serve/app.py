"""OpenAI-compatible HTTP API over one or more loaded models (LLM objects: local, or later pool-backed).

Every error is OpenAI's shape {"error": {message, type, param, code}} with a 4xx status for the client's
mistakes; nothing a client sends produces a traceback. A client that disconnects mid-stream cancels its
request, which frees its KV slot at the next engine step."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cairn.config import SamplingParams
from cairn.engine.api import LLM, RequestHandle
from cairn.engine.engine import Event, QueueFullError
from cairn.errors import ContextLengthError, UserError
from cairn.serve.metrics import Metrics
from cairn.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.param, self.code), self.status, headers=self.headers)


def create_app(models: dict[str, LLM] | None = None, *, loader: Callable[[], dict[str, LLM]] | None = None,
               api_key: str | None = None) -> FastAPI:
    """An app serving `models` (name -> LLM), or the ones `loader` returns, loaded in the background while
    /health answers 503."""
    state = {"models": dict(models or {}), "ready": models is not None, "load_error": None}
    metrics = Metrics(lambda: {n: m.stats() for n, m in state["models"].items()})
    app = FastAPI(title="cairn", version="0.1.0")
    app.state.cairn = state

    if loader is not None:
        def load():
            try:
                state["models"] = loader()
                state["ready"] = True
            except Exception as e:  # reported by /health and every request
                state["load_error"] = f"{type(e).__name__}: {e}"

        threading.Thread(target=load, name="cairn-load", daemon=True).start()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        return _bad_request(e.errors())

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def model(name: str) -> LLM:
        if not state["ready"]:
            if state["load_error"]:
                raise APIError(503, f"model loading failed: {state['load_error']}", "server_error")
            raise APIError(503, "models are still loading; retry shortly", "server_error", headers={"Retry-After": "1"})
        if name not in state["models"]:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(state['models'])}",
                           "not_found_error", "model", "model_not_found")
        return state["models"][name]

    @app.get("/health")
    async def health():
        if state["ready"]:
            return {"status": "ok", "models": list(state["models"])}
        return JSONResponse({"status": "loading" if not state["load_error"] else "failed",
                             "error": state["load_error"]}, 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "cairn"}
                                           for n in state["models"]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        llm = model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = await asyncio.to_thread(llm.render_chat, messages)
        params = _params(body, body.max_completion_tokens or body.max_tokens,
                         (body.top_logprobs or 0) if body.logprobs else None)
        handles = _submit(llm, [prompt], params, body.n, body.seed)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_stream(llm, body.model, handles, rid, created, usage, metrics, body.n))
        outs = await _gather(body.model, handles, metrics)
        choices = []
        for i, (h, evs) in enumerate(outs):
            text, finish = "".join(e.text for e in evs), evs[-1].finish_reason
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": [_chat_logprob(llm, e) for e in evs if e.logprob]}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(outs, body.n)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _parse(request, CompletionRequest)
        llm = model(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        ids = [llm.encode_prompt(p) for p in prompts]
        params = _params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
        handles = _submit(llm, ids, params, body.n, body.seed)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [llm.tokenizer.decode(p) if body.echo else "" for p in ids for _ in range(body.n)]
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_stream(llm, body.model, handles, rid, created, usage, echo, metrics, body.n))
        outs = await _gather(body.model, handles, metrics)
        choices = []
        for i, (h, evs) in enumerate(outs):
            text = echo[i] + "".join(e.text for e in evs)
            lp = _completion_logprobs(llm, evs, len(echo[i])) if body.logprobs is not None else None
            choices.append({"index": i, "text": text, "finish_reason": evs[-1].finish_reason, "logprobs": lp})
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(outs, body.n)}

    return app


def _bad_request(errors: list) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = first.get("msg", "invalid request")
    param = ".".join(loc) or None
    return JSONResponse(error_body(f"{param + ': ' if param else ''}{msg}", param=param), 400)


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
        errs = e.errors(include_url=False)
        first = errs[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


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
        )
    except UserError as e:
        raise APIError(400, str(e), param=e.param) from None


def _submit(llm: LLM, prompts: list[list[int]], params: SamplingParams, n: int, seed: int | None) -> list[RequestHandle]:
    handles: list[RequestHandle] = []
    try:
        for ids in prompts:
            for i in range(n):
                p = params if seed is None or n == 1 else replace(params, seed=seed + i)
                handles.append(llm.submit(ids, p))
    except (UserError, QueueFullError) as e:
        for h in handles:
            h.cancel()
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else e.code
        raise APIError(400, str(e), param=e.param, code=code) from None
    return handles


async def _events(name: str, h: RequestHandle, metrics: Metrics) -> AsyncIterator[Event]:
    """A handle's events, observing time to first token and inter-token latency."""
    metrics.prompt_tokens.labels(name).inc(h.prompt_tokens)
    last = None
    async for ev in h:
        if ev.token_id is not None:
            now = time.perf_counter()
            if last is None:
                metrics.ttft.labels(name).observe(now - h.started)
            else:
                metrics.itl.labels(name).observe(now - last)
            last = now
            metrics.generation_tokens.labels(name).inc()
        if ev.error:
            if ev.error_status == 503:
                raise APIError(503, ev.error, "server_error", code="insufficient_capacity", headers={"Retry-After": "5"})
            raise APIError(500, f"generation failed: {ev.error}", "server_error")
        yield ev


async def _gather(name, handles, metrics) -> list[tuple[RequestHandle, list[Event]]]:
    async def one(h):
        return h, [ev async for ev in _events(name, h, metrics)]

    try:
        return await asyncio.gather(*(one(h) for h in handles))
    finally:
        for h in handles:
            h.cancel()


async def _merged(name, handles, metrics) -> AsyncIterator[tuple[int, Event]]:
    """Events of several handles as they come, tagged with the choice index."""
    if len(handles) == 1:
        async for ev in _events(name, handles[0], metrics):
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            async for ev in _events(name, h, metrics):
                await q.put((i, ev))
        except APIError as e:
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        done = 0
        while done < len(handles):
            i, ev = await q.get()
            if isinstance(ev, APIError):
                raise ev
            done += ev.finish_reason is not None
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


def _sse(gen: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for obj in gen:
                yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(str(e), e.type, e.param, e.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(name, handles, base, opening, choice, include_usage, metrics, n):
    """SSE chunks: the opening ones, then one per event that carries text, logprobs or a finish, then usage."""
    counts = [0] * len(handles)
    try:
        for chunk in opening:
            yield {**base, "choices": [chunk]}
        async for i, ev in _merged(name, handles, metrics):
            counts[i] += ev.token_id is not None
            if ev.text or ev.finish_reason is not None or ev.logprob:
                yield {**base, "choices": [choice(i, ev)]}
        if include_usage:
            yield {**base, "choices": [], "usage": _usage_counts(handles, counts, n)}
    finally:
        for h in handles:
            h.cancel()


def _chat_stream(llm, name, handles, rid, created, include_usage, metrics, n):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
               for i in range(len(handles))]

    def choice(i, ev):
        lp = {"content": [_chat_logprob(llm, ev)]} if ev.logprob else None
        delta = {"content": ev.text} if ev.text else {}
        return {"index": i, "delta": delta, "finish_reason": ev.finish_reason, "logprobs": lp}

    return _stream(name, handles, base, opening, choice, include_usage, metrics, n)


def _completion_stream(llm, name, handles, rid, created, include_usage, echo, metrics, n):
    base = {"id": rid, "object": "text_completion", "created": created, "model": name}
    opening = [{"index": i, "text": text, "finish_reason": None, "logprobs": None}
               for i, text in enumerate(echo) if text]

    def choice(i, ev):
        lp = _completion_logprobs(llm, [ev], 0) if ev.logprob else None
        return {"index": i, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": lp}

    return _stream(name, handles, base, opening, choice, include_usage, metrics, n)


def _token_text(llm: LLM, token_id: int) -> str:
    return llm.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprob(llm: LLM, ev: Event) -> dict:
    lp = ev.logprob

    def entry(tid, value):
        text = _token_text(llm, tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _completion_logprobs(llm: LLM, events: list[Event], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        if not ev.logprob:
            continue
        text = _token_text(llm, ev.logprob.token_id)
        tokens.append(text)
        lps.append(ev.logprob.logprob)
        tops.append({_token_text(llm, t): v for t, v in ev.logprob.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _usage(outs, n: int) -> dict:
    return _usage_counts([h for h, _ in outs], [sum(e.token_id is not None for e in evs) for _, evs in outs], n)


def _usage_counts(handles, counts, n: int) -> dict:
    """Prompt tokens count once per prompt (not per each of its n choices), as OpenAI reports them."""
    prompt = sum(h.prompt_tokens for h in handles[::n])
    completion = sum(counts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

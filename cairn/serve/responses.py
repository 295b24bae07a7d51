"""Engine events into OpenAI responses: gathered into one body, or streamed as server-sent events.

Handles are prompt-major: the choices of prompt 0, then those of prompt 1, ...; `group` is how many handles each
prompt has (n, or best_of when more are generated than returned)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cairn.engine.api import LLM, RequestHandle
from cairn.engine.engine import Event, TokenLogprob
from cairn.serve import protocol as p
from cairn.serve.errors import APIError, from_generation
from cairn.serve.metrics import Metrics
from cairn.serve.observe import RequestInfo

log = logging.getLogger("cairn.serve")


async def events(h: RequestHandle, info: RequestInfo, metrics: Metrics) -> AsyncIterator[Event]:
    """A handle's events, observing time to first token and inter-token latency; a failed request raises APIError."""
    name = info.model
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
        if ev.error is not None:
            raise from_generation(ev.error, info.id)
        yield ev


async def gather(handles: list[RequestHandle], info: RequestInfo, metrics: Metrics) -> list[list[Event]]:
    """Every handle's events, once all have finished (all are cancelled if one fails)."""
    async def one(h):
        return [ev async for ev in events(h, info, metrics)]

    try:
        return await asyncio.gather(*(one(h) for h in handles))
    finally:
        for h in handles:
            h.cancel()


async def merged(handles: list[RequestHandle], info: RequestInfo, metrics: Metrics) -> AsyncIterator[tuple[int, Event]]:
    """Events of several handles as they come, tagged with the handle's index."""
    if len(handles) == 1:
        async for ev in events(handles[0], info, metrics):
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            async for ev in events(h, info, metrics):
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


def sse(chunks: AsyncIterator[BaseModel], info: RequestInfo) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, an error object if generation fails, then [DONE]."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:  # a bug mid-stream: the status line is sent, so the client gets an error event
            log.exception("request %s failed mid-stream", info.id)
            err = APIError(500, f"internal error (request {info.id}); the server log has the details", "server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream(handles: list[RequestHandle], info: RequestInfo, metrics: Metrics, opening: list[BaseModel],
                 choice: Callable[[int, Event], BaseModel], chunk: Callable[..., BaseModel], include_usage: bool,
                 group: int) -> AsyncIterator[BaseModel]:
    """Chunks: the opening ones, then one per event with text, logprobs or a finish, then the usage if asked."""
    counts = [0] * len(handles)
    try:
        for c in opening:
            yield chunk([c])
        async for i, ev in merged(handles, info, metrics):
            counts[i] += ev.token_id is not None
            info.completion_tokens = sum(counts)
            if ev.text or ev.finish_reason is not None or ev.logprob:
                yield chunk([choice(i, ev)])
        usage = usage_counts(handles, counts, group)
        info.prompt_tokens = usage.prompt_tokens
        if include_usage:
            yield chunk([], usage)
    finally:
        for h in handles:
            h.cancel()


def usage(handles: list[RequestHandle], outs: list[list[Event]], group: int) -> p.Usage:
    return usage_counts(handles, [sum(e.token_id is not None for e in evs) for evs in outs], group)


def usage_counts(handles: list[RequestHandle], counts: list[int], group: int) -> p.Usage:
    """Prompt tokens count once per prompt (not per each of its choices), as OpenAI reports them."""
    prompt = sum(h.prompt_tokens for h in handles[::group])
    cached = sum(max(h.cached_tokens for h in handles[i : i + group]) for i in range(0, len(handles), group))
    completion = sum(counts)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


# ----- chat


def chat_response(llm: LLM, base: dict, handles, outs: list[list[Event]], logprobs: bool, group: int) -> p.ChatCompletion:
    choices = []
    for i, evs in enumerate(outs):
        lp = p.ChatLogprobs(content=[chat_logprob(llm, e.logprob) for e in evs if e.logprob]) if logprobs else None
        message = p.AssistantMessage(content="".join(e.text for e in evs))
        choices.append(p.ChatChoice(index=i, message=message, finish_reason=evs[-1].finish_reason, logprobs=lp))
    return p.ChatCompletion(**base, choices=choices, usage=usage(handles, outs, group))


def chat_stream(llm: LLM, base: dict, handles, info, metrics, include_usage: bool, group: int):
    opening = [p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content="")) for i in range(len(handles))]

    def choice(i, ev):
        lp = p.ChatLogprobs(content=[chat_logprob(llm, ev.logprob)]) if ev.logprob else None
        return p.ChatChunkChoice(index=i, delta=p.ChatDelta(content=ev.text or None), finish_reason=ev.finish_reason,
                                 logprobs=lp)

    def chunk(choices, usage=None):
        return p.ChatCompletionChunk(**base, choices=choices, usage=usage)

    return stream(handles, info, metrics, opening, choice, chunk, include_usage, group)


def token_text(llm: LLM, token_id: int) -> str:
    return llm.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprob(llm: LLM, lp: TokenLogprob) -> p.ChatTokenLogprob:
    def entry(tid, value):
        text = token_text(llm, tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return p.ChatTokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])


# ----- completions


def completion_logprobs(llm: LLM, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> p.CompletionLogprobs:
    """OpenAI's legacy logprobs of (token id, its logprob or None) pairs, text offsets counted from `offset`."""
    out = p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for tid, lp in entries:
        text = token_text(llm, tid)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {token_text(llm, t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def generated(evs: list[Event]) -> list[tuple[int, TokenLogprob]]:
    return [(e.logprob.token_id, e.logprob) for e in evs if e.logprob]


def cumulative_logprob(evs: list[Event]) -> float:
    return sum(e.logprob.logprob for e in evs if e.logprob)


def completion_response(llm: LLM, base: dict, handles, outs, echoes: list[tuple[str, list]], logprobs: bool,
                        n: int, group: int) -> p.TextCompletion:
    """Choices prompt-major; with best_of (group > n), the n of each prompt's group with the highest cumulative
    logprob, best first. `echoes`: per prompt, the echoed text and its (token id, logprob) entries."""
    choices = []
    for k, (echo_text, echo_entries) in enumerate(echoes):
        group_outs = outs[k * group:(k + 1) * group]
        if group > n:
            group_outs = sorted(group_outs, key=cumulative_logprob, reverse=True)[:n]
        for evs in group_outs:
            lp = completion_logprobs(llm, echo_entries + generated(evs), 0) if logprobs else None
            choices.append(p.CompletionChoice(index=len(choices), text=echo_text + "".join(e.text for e in evs),
                                              finish_reason=evs[-1].finish_reason, logprobs=lp))
    return p.TextCompletion(**base, choices=choices, usage=usage(handles, outs, group))


def completion_stream(llm: LLM, base: dict, handles, info, metrics, include_usage: bool,
                      echoes: list[tuple[str, list]], logprobs: bool, n: int):
    """The choices of `handles` (n per prompt, prompt-major) as chunks; text offsets run on across chunks."""
    firsts = [echoes[i // n] for i in range(len(handles))]
    offsets = [0] * len(handles)
    opening = []
    for i, (text, entries) in enumerate(firsts):
        if text:
            lp = completion_logprobs(llm, entries, 0) if logprobs else None
            offsets[i] = sum(len(t) for t in lp.tokens) if lp else 0
            opening.append(p.CompletionChoice(index=i, text=text, logprobs=lp))

    def choice(i, ev):
        lp = None
        if logprobs and ev.logprob:
            lp = completion_logprobs(llm, [(ev.logprob.token_id, ev.logprob)], offsets[i])
            offsets[i] += len(lp.tokens[0])
        return p.CompletionChoice(index=i, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp)

    def chunk(choices, usage=None):
        return p.TextCompletion(**base, choices=choices, usage=usage)

    return stream(handles, info, metrics, opening, choice, chunk, include_usage, n)

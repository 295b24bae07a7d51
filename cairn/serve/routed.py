"""Requests to a router's name (`auto`): which served model answers, decided by the router (cairn/route).

- rules: the first matching rule's model, from the prompt's text and length and the requested name.
- learned: one prompt forward of the small model for its hidden states, the classifier's probability that the
  small model will do, against the threshold.
- cascade: each model but the last answers in turn, held back from the client; the answer is kept when its least
  confident choice reaches the threshold (an agreement signal also samples `samples` extra answers), else it is
  dropped and the next model answers. A streaming request streams from the model that finally answers: a kept
  held-back answer is replayed as it was produced, an escalated one streams live.

Each attempt is recorded on the request (model, tokens, seconds) for /metrics and the log line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from cairn.config import SamplingParams
from cairn.engine.api import LLM, RequestHandle
from cairn.engine.engine import Event
from cairn.errors import UserError
from cairn.route import config as rc
from cairn.route.learned import Classifier, load_for
from cairn.route.signals import confidence
from cairn.serve import names
from cairn.serve.errors import from_generation
from cairn.serve.observe import RequestInfo

ROUTER_OWNER = "cairn-router"


@dataclass
class Route:
    spec: rc.RouterSpec
    classifier: Classifier | None = None


def check_specs(specs: list[rc.RouterSpec], served: list[str],
                config_of: Callable | None = None) -> dict[str, Classifier]:
    """Every router routes between served models and answers to names that follow the naming rule; a learned
    router's classifier fits its small model (config_of(name): its ModelConfig). Returns the learned routers'
    classifiers by router path (when config_of is given)."""
    virtual: dict[str, str] = {}
    classifiers = {}
    for spec in specs:
        missing = [m for m in spec.models if m not in served]
        if missing:
            raise UserError(f"router {spec.path} routes between {list(spec.models)}, but {missing} "
                            f"{'is' if len(missing) == 1 else 'are'} not served (served: {', '.join(served)}); serve "
                            "those models, or name them so with --served-name", param="router")
        for name in spec.names():
            if name in virtual:
                raise UserError(f"two routers answer to {name!r}; give one another `name:`", param="router")
            virtual[name] = f"router {spec.path}"
        if spec.type == "learned" and config_of is not None:
            classifiers[spec.path] = load_for(spec.path, spec.models[0], config_of(spec.models[0]))
    names.check(served, virtual)
    return classifiers


def build(specs: list[rc.RouterSpec], models: dict[str, LLM]) -> dict[str, Route]:
    """name -> Route for every name the routers answer to, checked against the loaded models."""
    classifiers = check_specs(specs, list(models), lambda n: models[n].model_config)
    return {name: Route(spec, classifiers.get(spec.path)) for spec in specs for name in spec.names()}


class Replay:
    """A finished, held-back attempt offered again as a RequestHandle is read by the response code: the same events
    (logprobs trimmed to what the client asked for), its prompt and cache counts and its start time."""

    def __init__(self, handle: RequestHandle, events: list[Event], logprobs: int | None):
        self.id, self.prompt_tokens, self.cached_tokens = handle.id, handle.prompt_tokens, handle.cached_tokens
        self.started = handle.started
        self._events = [ev if ev.logprob is None else replace(
            ev, logprob=None if logprobs is None else replace(ev.logprob, top=ev.logprob.top[:logprobs]))
            for ev in events]

    async def _iter(self):
        for ev in self._events:
            yield ev

    def __aiter__(self):
        return self._iter()

    def cancel(self) -> None:
        pass


async def _held(handles: list[RequestHandle], info: RequestInfo) -> list[list[Event]]:
    """Every event of each attempt, not shown to the client (a failure is the client's error)."""
    async def one(h):
        out = []
        async for ev in h:
            if ev.error is not None:
                raise from_generation(ev.error, info.id)
            out.append(ev)
        return out

    try:
        return await asyncio.gather(*(one(h) for h in handles))
    finally:
        for h in handles:
            h.cancel()


def _record(info: RequestInfo, model: str, handles, events: list[list[Event]], seconds: float) -> None:
    """A dropped cascade answer: what it cost."""
    tokens = sum(ev.token_id is not None for evs in events for ev in evs)
    info.attempts.append({"model": model, "prompt_tokens": sum(h.prompt_tokens for h in handles),
                          "completion_tokens": tokens, "seconds": seconds})


async def dispatch(route: Route, requested: str, models: dict[str, LLM],
                   prepare: Callable[[LLM], tuple[list[list[int]], str]], params: SamplingParams, n: int,
                   seed: int | None, submit: Callable, info: RequestInfo) -> tuple[str, LLM, list[list[int]], list]:
    """The answering model's name, its LLM, the prompts' token ids for it and the handles its response is built
    from. `prepare(llm)` gives the prompts' token ids for that model and the prompt's text; `submit(llm, ids,
    params, n, seed)` queues them."""
    spec = route.spec
    info.router = spec.name
    t0 = time.perf_counter()
    if spec.type != "cascade":
        if spec.type == "rules":
            ids, text = await asyncio.to_thread(prepare, models[spec.models[0]])
            name = rc.choose_by_rules(spec, text, max(len(x) for x in ids), requested)
        else:
            small = models[spec.models[0]]
            ids, _ = await asyncio.to_thread(prepare, small)
            clf = route.classifier
            p = await asyncio.to_thread(lambda: min(float(clf.prob(small.prompt_features(x, clf.layers))) for x in ids))
            name = rc.choose_learned(spec, p)
        info.route_seconds = time.perf_counter() - t0
        llm = models[name]
        if name != spec.models[0]:
            ids, _ = await asyncio.to_thread(prepare, llm)
        info.answer_started = time.perf_counter()
        return name, llm, ids, submit(llm, ids, params, n, seed)
    info.route_seconds = 0.0
    forced = replace(params, logprobs=max(params.logprobs or 0, spec.top_logprobs))
    for name in spec.models[:-1]:
        llm = models[name]
        ids, _ = await asyncio.to_thread(prepare, llm)
        started = time.perf_counter()
        handles = submit(llm, ids, forced, n, seed)
        events = await _held(handles, info)
        c0 = time.perf_counter()
        extra = await _samples(llm, ids, spec, params, submit, info) if spec.signal == "agreement" else None
        least = min(_confidence(spec, evs, extra[i // n] if extra else None) for i, evs in enumerate(events))
        info.route_seconds += time.perf_counter() - c0
        if rc.cascade_accepts(spec, least):
            info.answer_started = started  # its tokens and seconds are counted as the answer's
            return name, llm, ids, [Replay(h, evs, params.logprobs) for h, evs in zip(handles, events)]
        _record(info, name, handles, events, time.perf_counter() - started)
    name = spec.models[-1]
    llm = models[name]
    ids, _ = await asyncio.to_thread(prepare, llm)
    info.answer_started = time.perf_counter()
    return name, llm, ids, submit(llm, ids, params, n, seed)


def _text(evs: list[Event]) -> str:
    return "".join(ev.text for ev in evs)


def _confidence(spec: rc.RouterSpec, evs: list[Event], samples: list[str] | None) -> float:
    lps = [ev.logprob for ev in evs if ev.logprob is not None]
    return confidence(spec.signal, [lp.logprob for lp in lps], [[v for _, v in lp.top] for lp in lps], _text(evs),
                      samples)


async def _samples(llm: LLM, ids: list[list[int]], spec: rc.RouterSpec, params: SamplingParams, submit: Callable,
                   info: RequestInfo) -> list[list[str]]:
    """`spec.samples` extra answers per prompt at the sampling temperature (agreement's evidence)."""
    p = replace(params, temperature=spec.sample_temperature, logprobs=None,
                seed=None if params.seed is None else params.seed + 7919)
    handles = submit(llm, ids, p, spec.samples, p.seed)
    events = await _held(handles, info)
    return [[_text(evs) for evs in events[i * spec.samples:(i + 1) * spec.samples]] for i in range(len(ids))]

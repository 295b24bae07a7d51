"""Prometheus metrics of one server (own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, stats_by_model):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cairn_requests", "HTTP requests by route template ('other' for unknown paths) and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cairn_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("cairn_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("cairn_time_to_first_token_seconds", "Time from request to first token", ["model"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("cairn_inter_token_latency_seconds", "Time between consecutive tokens", ["model"],
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.route_requests = Counter("cairn_route_requests", "Requests to a router's name, by the model that answered "
                                      "and status", ["router", "model", "status"], registry=r)
        self.route_escalations = Counter("cairn_route_escalations", "Answers a cascade dropped (and escalated), by the "
                                         "model that gave them", ["router", "model"], registry=r)
        self.route_tokens = Counter("cairn_route_tokens", "Tokens of routed requests by model and kind (prompt, "
                                    "completion), dropped cascade answers included", ["router", "model", "kind"],
                                    registry=r)
        self.route_seconds = Counter("cairn_route_seconds", "Seconds each model spent on routed requests, from "
                                     "submission to the last token, dropped cascade answers included: the routes' "
                                     "cost", ["router", "model"], registry=r)
        self.route_decision_seconds = Counter("cairn_route_decision_seconds", "Seconds the routers spent deciding (a "
                                              "learned router's prompt forward, a cascade's confidence)", ["router"],
                                              registry=r)
        queue = Gauge("cairn_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        running = Gauge("cairn_running_sequences", "Sequences holding a KV-cache slot", ["model"], registry=r)
        blocks = Gauge("cairn_kv_blocks", "KV-cache blocks by state: used (held by running sequences), cached "
                       "(a prompt prefix nobody holds now, reusable), free", ["model", "state"], registry=r)
        engine = {key: Gauge(name, doc, ["model"], registry=r) for key, name, doc in [
            ("block_size", "cairn_kv_block_size_tokens", "Positions per KV-cache block"),
            ("block_bytes", "cairn_kv_block_bytes", "Bytes of one KV-cache block over all layers"),
            ("bytes_touched", "cairn_kv_bytes_touched", "Bytes of the KV-cache blocks used at least once so far"),
            ("preemptions", "cairn_preemptions", "Sequences preempted for KV blocks so far (resumed later)"),
            ("cached_prompt_tokens", "cairn_prompt_tokens_cached", "Prompt tokens served from the prefix cache so far"),
        ]}
        self._gauges = (queue, running, blocks, engine, stats_by_model)

    def record_route(self, info, now: float) -> None:
        """A routed request's answer and dropped attempts (info: observe.RequestInfo)."""
        router = info.router
        for a in info.attempts:  # held back, so not counted as they were generated
            self.route_escalations.labels(router, a["model"]).inc()
            self.prompt_tokens.labels(a["model"]).inc(a["prompt_tokens"])
            self.generation_tokens.labels(a["model"]).inc(a["completion_tokens"])
            self._route_cost(router, a["model"], a["prompt_tokens"], a["completion_tokens"], a["seconds"])
        self.route_decision_seconds.labels(router).inc(info.route_seconds)
        if info.answered_by is not None:
            self.route_requests.labels(router, info.answered_by, str(info.status or 499)).inc()
            seconds = 0.0 if info.answer_started is None else now - info.answer_started
            self._route_cost(router, info.answered_by, info.prompt_tokens, info.completion_tokens, seconds)

    def _route_cost(self, router: str, model: str, prompt: int, completion: int, seconds: float) -> None:
        self.route_tokens.labels(router, model, "prompt").inc(prompt)
        self.route_tokens.labels(router, model, "completion").inc(completion)
        self.route_seconds.labels(router, model).inc(max(0.0, seconds))

    def render(self) -> bytes:
        queue, running, blocks, engine, stats_by_model = self._gauges
        for name, stats in stats_by_model().items():
            queue.labels(name).set(stats["waiting"])
            running.labels(name).set(stats["running"])
            for state in ("used", "cached", "free"):
                if f"blocks_{state}" in stats:
                    blocks.labels(name, state).set(stats[f"blocks_{state}"])
            for key, gauge in engine.items():
                if key in stats:
                    gauge.labels(name).set(stats[key])
        return generate_latest(self.registry)

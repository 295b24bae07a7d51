"""`cairn router train | calibrate | eval`: typed functions over loaded models (the CLI loads them).

Routing data is JSONL, one prompt per line (`prompt` text or chat `messages`) and how to tell how well each model
does on it, any of:
- `answer`: a string or a list of acceptable ones (as `cairn eval --generate` items): both models answer greedily
  and each answer scores 1 when it contains (or, with --metric exact_match, equals) an acceptable one, else 0;
- `scores`: {MODEL_NAME: quality} measured elsewhere (e.g. from `cairn eval --generate` results, or by people);
- `winner`: MODEL_NAME or "tie" (preference data, as RouteLLM trains on arena battles): 1 for the winner, 0 for
  the other, 0.5 each for a tie;
- none of these: with --judge MODEL, both models answer and the judge rates each answer 1-5 (scored (r - 1) / 4).

The small model is good enough on an item when its quality is at least the large model's (both wrong counts:
escalating would not have helped)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from cairn.config import SamplingParams
from cairn.errors import UserError
from cairn.route import config as rc
from cairn.route import curve as cv
from cairn.route.learned import Classifier, auc, feature_layers, load_for
from cairn.route.learned import train as fit_classifier
from cairn.route.signals import confidence


class RouteItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    answer: str | list[str] | None = None
    scores: dict[str, float] | None = None
    winner: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RouteItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def chat(self) -> list[dict]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]

    def text(self) -> str:
        return self.prompt if self.prompt is not None else "\n".join(str(m.get("content", "")) for m in self.messages)


def read_items(path: str | Path) -> list[RouteItem]:
    from cairn.eval.data import _items

    return _items(Path(path), RouteItem)


@dataclass
class Answers:
    """One model's greedy answers to every item, with what a cascade reads of them."""

    texts: list[str]
    logprobs: list[list[float]]
    tops: list[list[list[float]]]


def answer(llm, items: list[RouteItem], max_tokens: int, top_logprobs: int = 5, show: bool = False,
           label: str = "") -> Answers:
    """Greedy answers to every item's chat, all submitted at once (the engine batches them)."""
    from tqdm import tqdm

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=top_logprobs)
    handles = [llm.submit(llm.render_chat(it.chat()), params) for it in items]
    done = [h.result() for h in tqdm(handles, desc=f"answers {label}", disable=not show, file=sys.stderr)]
    return Answers([c.text for c in done], [[lp.logprob for lp in c.logprobs] for c in done],
                   [[[v for _, v in lp.top] for lp in c.logprobs] for c in done])


def samples(llm, items: list[RouteItem], n: int, temperature: float, max_tokens: int, seed: int = 0) -> list[list[str]]:
    """n sampled answers per item (the agreement signal's evidence)."""
    handles = [[llm.submit(llm.render_chat(it.chat()), SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                       seed=seed + 1000 * i + k))
                for k in range(n)] for i, it in enumerate(items)]
    return [[h.result().text for h in hs] for hs in handles]


def needs_answers(items: list[RouteItem]) -> bool:
    return any(it.scores is None and it.winner is None for it in items)


def qualities(items: list[RouteItem], names: tuple[str, str], small: Answers | None, large: Answers | None,
              judge=None, metric: str = "contains") -> tuple[list[float], list[float]]:
    """Each item's quality for the small and the large model (see the module docstring)."""
    from cairn.eval import generate
    from cairn.eval.judge import rate

    match = generate.contains if metric == "contains" else generate.exact_match
    out: list[tuple[float, float] | None] = []
    to_judge = []
    for i, it in enumerate(items):
        if it.scores is not None:
            missing = [n for n in names if n not in it.scores]
            if missing:
                raise UserError(f"item {i + 1}: scores has no entry for {missing} (it has {sorted(it.scores)})",
                                param="data")
            out.append((float(it.scores[names[0]]), float(it.scores[names[1]])))
        elif it.winner is not None:
            if it.winner not in (*names, "tie"):
                raise UserError(f"item {i + 1}: winner {it.winner!r} is neither of {list(names)} nor 'tie'",
                                param="data")
            won = (0.5, 0.5) if it.winner == "tie" else (float(it.winner == names[0]), float(it.winner == names[1]))
            out.append(won)
        elif it.answer is not None:
            ok = [it.answer] if isinstance(it.answer, str) else list(it.answer)
            out.append((float(match(small.texts[i], ok)), float(match(large.texts[i], ok))))
        else:
            if judge is None:
                raise UserError(f"item {i + 1} has no answer, scores or winner: give --judge MODEL to rate both "
                                "models' answers", param="data")
            to_judge.append(i)
            out.append(None)
    if to_judge:
        pairs = [(items[i].text(), a.texts[i]) for a in (small, large) for i in to_judge]
        ratings = [(r - 1) / 4 if r is not None else 0.0 for r in rate(judge, pairs)]
        for k, i in enumerate(to_judge):
            out[i] = (ratings[k], ratings[len(to_judge) + k])
    return [q[0] for q in out], [q[1] for q in out]


def features(llm, items: list[RouteItem], layers: int | None) -> torch.Tensor:
    """(N, 2H) prompt features of the small model after its first `layers` blocks."""
    return torch.stack([llm.prompt_features(llm.render_chat(it.chat()), layers) for it in items])


# ----- train


def train(small, large, items: list[RouteItem], names: tuple[str, str], out: str, judge=None,
          metric: str = "contains", max_tokens: int = 32, share: float | None = None, show: bool = False) -> dict:
    """Fit a learned router for (small, large) on `items` and write OUT/router.yaml and OUT/classifier.safetensors.
    Its threshold is 0.5, or the one sending `share` of the training items to the large model."""
    ans_small = ans_large = None
    if needs_answers(items):
        ans_small = answer(small, items, max_tokens, show=show, label=names[0])
        ans_large = answer(large, items, max_tokens, show=show, label=names[1])
    q_small, q_large = qualities(items, names, ans_small, ans_large, judge, metric)
    labels = [int(a >= b) for a, b in zip(q_small, q_large)]
    layers = feature_layers(small.model_config.num_layers)
    x = features(small, items, layers)
    clf, report = fit_classifier(x, labels)
    clf.layers = layers
    p = clf.prob(x).tolist()
    threshold = 0.5 if share is None else threshold_for_share(p, share)
    identity = _identity(small)
    spec = rc.RouterSpec("learned", names, threshold=threshold,
                         extra={"trained": {"small_model": identity, "features": int(x.shape[1]),
                                            "feature_layers": layers,
                                            "items": len(items), "metric": metric, **report}})
    Path(out).mkdir(parents=True, exist_ok=True)
    clf.save(Path(out) / rc.CLASSIFIER_FILE, {"small_model": json.dumps(identity), "features": str(x.shape[1])})
    rc.save(spec, out)
    return {"router": out, "threshold": threshold, "quality_small": sum(q_small) / len(items),
            "quality_large": sum(q_large) / len(items), **report}


def _identity(llm) -> dict:
    """Which small model a classifier reads: its directory's name and hidden size (checked when serving)."""
    return {"name": Path(llm.model_dir).name, "hidden_size": llm.model_config.hidden_size}


def load_classifier(spec: rc.RouterSpec, small) -> Classifier:
    """A learned router's classifier, checked against the small model (a loaded LLM) that will feed it."""
    return load_for(spec.path, spec.models[0], small.model_config)


# ----- scores, calibrate


def threshold_for_share(scores: list[float], share: float) -> float:
    """A threshold sending (about) `share` of these items to the large model: those scored below it."""
    if not 0 <= share <= 1:
        raise UserError(f"--share must be in [0, 1], got {share}", param="share")
    s = sorted(scores)
    k = round(share * len(s))
    if k == 0:
        return s[0]
    if k == len(s):
        return s[-1] + max(1e-6, abs(s[-1]) * 1e-6)
    return (s[k - 1] + s[k]) / 2


def router_scores(spec: rc.RouterSpec, small, items: list[RouteItem], small_answers: Answers | None,
                  max_tokens: int) -> list[float]:
    """Per item, the router's score: higher keeps it on the small model (learned: probability; cascade:
    confidence; rules: 1 when the rules pick the small model, else 0)."""
    if spec.type == "learned":
        clf = load_classifier(spec, small)
        return clf.prob(features(small, items, clf.layers)).tolist()
    if spec.type == "rules":
        return [float(rc.choose_by_rules(spec, it.text(), len(small.render_chat(it.chat())), spec.name)
                      == spec.models[0]) for it in items]
    extra = (samples(small, items, spec.samples, spec.sample_temperature, max_tokens)
             if spec.signal == "agreement" else [[] for _ in items])
    a = small_answers
    return [confidence(spec.signal, a.logprobs[i], a.tops[i], a.texts[i], extra[i]) for i in range(len(items))]


def calibrate(spec: rc.RouterSpec, small, items: list[RouteItem], share: float, out: str | None,
              max_tokens: int = 32, show: bool = False) -> dict:
    """Set the router's threshold so that `share` of `items` go to the large model; write it (to OUT, or back)."""
    if spec.type == "rules":
        raise UserError("a rules router has no threshold to calibrate", param="router")
    ans = answer(small, items, max_tokens, spec.top_logprobs, show, spec.models[0]) if spec.type == "cascade" else None
    scores = router_scores(spec, small, items, ans, max_tokens)
    finite = [s for s in scores if s > -math.inf]
    threshold = threshold_for_share(finite, max(0.0, (share * len(scores) - (len(scores) - len(finite)))
                                                / max(1, len(finite)))) if finite else 0.0
    new = replace(spec, threshold=threshold)
    dest = out or spec.path
    if out and spec.type == "learned":  # the classifier goes with its router
        Path(out).mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copy2(Path(spec.path) / rc.CLASSIFIER_FILE, Path(out) / rc.CLASSIFIER_FILE)
    rc.save(new, dest)
    sent = sum(s < threshold for s in scores) / len(scores)
    return {"router": str(dest), "threshold": threshold, "share_large": sent, "target_share": share}


# ----- eval


def measure_cost(llm, items: list[RouteItem], max_tokens: int, k: int) -> dict:
    """Seconds and tokens of one request at a time (nothing else running) over the first k items: what one
    request costs a model."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate([llm.render_chat(items[0].chat())], params)  # warm
    t0, tokens = time.perf_counter(), 0
    for it in items[:k]:
        tokens += len(llm.generate([llm.render_chat(it.chat())], params)[0].token_ids)
    n = min(k, len(items))
    return {"seconds_per_request": (time.perf_counter() - t0) / n, "tokens_per_request": tokens / n}


def measure_router_cost(spec: rc.RouterSpec, small, items: list[RouteItem], k: int, max_tokens: int = 32) -> float:
    """Seconds per request of the router's own decision, one request at a time: a learned router's prompt forward
    and classifier; a rules router's matching; a cascade's confidence from its answer's logprobs (the small answer
    itself is counted as the small model's cost), and with the agreement signal the extra samples it draws."""
    items = items[:k]
    if spec.type == "learned":
        clf = load_classifier(spec, small)
        clf.prob(features(small, items[:1], clf.layers))  # warm
    t0 = time.perf_counter()
    for it in items:
        if spec.type == "learned":
            clf.prob(small.prompt_features(small.render_chat(it.chat()), clf.layers))
        elif spec.type == "rules":
            rc.choose_by_rules(spec, it.text(), len(small.render_chat(it.chat())), spec.name)
        else:
            extra = (samples(small, [it], spec.samples, spec.sample_temperature, max_tokens)[0]
                     if spec.signal == "agreement" else [])
            confidence(spec.signal, [-0.1] * max_tokens, [[-0.1] * spec.top_logprobs] * max_tokens, "x", extra)
    return (time.perf_counter() - t0) / len(items)


def evaluate(specs: list[rc.RouterSpec], small, large, items: list[RouteItem], names: tuple[str, str],
             judge=None, metric: str = "contains", max_tokens: int = 32, cost_items: int = 16,
             show: bool = False) -> dict:
    """Each router's cost-quality curve on `items` beside random routing and each model alone (see curve.py)."""
    for spec in specs:
        if spec.models[0] != names[0] or spec.models[-1] != names[1]:
            raise UserError(f"router {spec.path} routes between {list(spec.models)}, not {list(names)}",
                            param="router")
    ans_small = answer(small, items, max_tokens, max(s.top_logprobs for s in specs), show, names[0])
    ans_large = answer(large, items, max_tokens, 0, show, names[1])
    q_small, q_large = qualities(items, names, ans_small, ans_large, judge, metric)
    costs = {names[0]: measure_cost(small, items, max_tokens, cost_items),
             names[1]: measure_cost(large, items, max_tokens, cost_items)}
    c_small, c_large = costs[names[0]]["seconds_per_request"], costs[names[1]]["seconds_per_request"]
    result = {"items": len(items), "metric": metric, "models": list(names), "costs": costs,
              "quality": {names[0]: sum(q_small) / len(items), names[1]: sum(q_large) / len(items)},
              "oracle": sum(max(a, b) for a, b in zip(q_small, q_large)) / len(items), "routers": []}
    labels = [int(a >= b) for a, b in zip(q_small, q_large)]
    for spec in specs:
        scores = router_scores(spec, small, items, ans_small, max_tokens)
        curve = cv.router_curve(scores, q_small, q_large)
        own = measure_router_cost(spec, small, items, cost_items, max_tokens)
        cascade = spec.type == "cascade"
        summary = cv.summary(curve, q_small, q_large, c_small, c_large, own, cascade)
        at = [s < spec.threshold for s in scores] if spec.threshold is not None else None
        result["routers"].append({
            "router": str(spec.path), "type": spec.type, "signal": spec.signal if cascade else None,
            "threshold": spec.threshold, "auc": auc(scores, labels), "own_seconds_per_request": own,
            "own_cost_vs_small_answer": own / c_small,
            "at_threshold": None if at is None else {
                "share_large": sum(at) / len(at),
                "quality": sum(ql if big else qs for big, qs, ql in zip(at, q_small, q_large)) / len(at)},
            "curve": {"shares": list(curve.shares), "qualities": list(curve.qualities)}, **summary})
    return result


def format_report(result: dict) -> str:
    names = result["models"]
    lines = [f"{result['items']} items ({result['metric']}): {names[0]} {result['quality'][names[0]]:.3f}, "
             f"{names[1]} {result['quality'][names[1]]:.3f}, oracle {result['oracle']:.3f}; seconds per request "
             + ", ".join(f"{n} {result['costs'][n]['seconds_per_request']:.3f}" for n in names),
             f"{'router':<34}{'PGR@20%':>9}{'PGR@50%':>9}{'PGR@80%':>9}{'share@95%':>11}{'cost@95%':>10}"
             f"{'min vs random':>15}{'own cost':>10}"]
    for r in result["routers"]:
        label = f"{r['type']}" + (f" ({r['signal']})" if r["signal"] else "") + f" {Path(r['router']).name}"
        share = "-" if r["share_for_target"] is None else f"{r['share_for_target']:.0%}"
        cost = "-" if r["cost_for_target_vs_large"] is None else f"{r['cost_for_target_vs_large']:.2f}x"
        lines.append(f"{label[:33]:<34}" + "".join(f"{r['pgr'][k]:>9.2f}" for k in ("20%", "50%", "80%"))
                     + f"{share:>11}{cost:>10}{r['min_margin_over_random']:>+15.3f}"
                     f"{r['own_cost_vs_small_answer']:>9.1%}")
    lines.append("share@95%: least share of requests sent to the large model reaching 95% of its quality; cost: "
                 "seconds per request there over the large model's; own cost: the router's, over a small answer's")
    return "\n".join(lines)


def plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["models"]
    qs, ql = result["quality"][names[0]], result["quality"][names[1]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in result["routers"]:
        label = r["type"] + (f" ({r['signal']})" if r["signal"] else "")
        ax.plot(r["curve"]["shares"], r["curve"]["qualities"], label=label)
    ax.plot([0, 1], [qs, ql], "--", color="grey", label="random")
    ax.scatter([0, 1], [qs, ql], color="black", zorder=3)
    ax.annotate(names[0], (0, qs), textcoords="offset points", xytext=(4, -12))
    ax.annotate(names[1], (1, ql), textcoords="offset points", xytext=(-60, 6))
    ax.axhline(0.95 * ql, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"share of requests sent to {names[1]}")
    ax.set_ylabel(f"quality ({result['metric']})")
    ax.set_title(f"routing {names[0]} / {names[1]}, {result['items']} held-out items")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)

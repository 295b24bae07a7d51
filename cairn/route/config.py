"""Router files and the pure decision of each router type.

A router is a YAML file, or a directory holding `router.yaml` (and, for a learned router, `classifier.safetensors`)
as `cairn router train` writes it:

    router: cascade            # cascade | learned | rules
    name: auto                 # the model name clients ask for (default auto)
    models: [student, smollm2] # served model names, cheapest first
    threshold: -0.4            # cascade: accept an answer whose confidence >= threshold, else escalate;
                               # learned: send to the small model when P(small is good enough) >= threshold
    signal: mean_logprob       # cascade: mean_logprob | min_logprob | entropy | agreement
    samples: 3                 # cascade, agreement: extra answers sampled ...
    sample_temperature: 0.7    # ... at this temperature
    rules:                     # rules: the first rule whose conditions all hold picks the model
      - {max_prompt_tokens: 64, model: student}
      - {regex: "(?i)\\b(prove|derive)\\b", model: smollm2}
      - {requested: gpt-4o-mini, model: student}   # also serves `gpt-4o-mini` as a name routed by this rule
    default: smollm2           # rules: when no rule matches (default: the last model)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cairn.errors import UserError
from cairn.route.signals import SIGNALS

TYPES = ("cascade", "learned", "rules")
ROUTER_FILE = "router.yaml"
CLASSIFIER_FILE = "classifier.safetensors"


@dataclass(frozen=True)
class Rule:
    """Conditions (all that are given must hold) and the model they pick."""

    model: str
    """The served model this rule sends to."""
    max_prompt_tokens: int | None = None
    """Holds when the prompt has at most this many tokens."""
    min_prompt_tokens: int | None = None
    """Holds when the prompt has at least this many tokens."""
    regex: str | None = None
    """Holds when this regular expression matches somewhere in the prompt's text (Python `re.search`)."""
    requested: str | None = None
    """Holds when the client asked for this model name (the router serves it as an alias)."""

    def matches(self, text: str, prompt_tokens: int, requested: str) -> bool:
        return ((self.max_prompt_tokens is None or prompt_tokens <= self.max_prompt_tokens)
                and (self.min_prompt_tokens is None or prompt_tokens >= self.min_prompt_tokens)
                and (self.regex is None or re.search(self.regex, text) is not None)
                and (self.requested is None or requested == self.requested))


@dataclass(frozen=True)
class RouterSpec:
    """One router, as read from its file."""

    type: str
    """cascade, learned or rules."""
    models: tuple[str, ...]
    """Served model names, cheapest first."""
    name: str = "auto"
    """The model name clients ask for."""
    threshold: float | None = None
    """cascade: least confidence accepted; learned: least P(small is good enough) kept on the small model."""
    signal: str = "mean_logprob"
    """cascade: which confidence signal (route/signals.py)."""
    samples: int = 0
    """cascade with agreement: extra answers sampled to compare with."""
    sample_temperature: float = 0.7
    """cascade with agreement: the extra answers' temperature."""
    top_logprobs: int = 5
    """cascade: alternatives kept per token (the entropy signal's top k)."""
    rules: tuple[Rule, ...] = ()
    """rules: tried in order."""
    default: str | None = None
    """rules: the model when no rule matches (None: the last, most capable model)."""
    path: str | None = None
    """Where the router was read from (a learned router's classifier sits beside its router.yaml)."""
    extra: dict = field(default_factory=dict)
    """Keys written by training that decisions do not use (what it was trained on, its scores)."""

    def names(self) -> list[str]:
        """The model names this router serves: its own, then the aliases its rules answer to."""
        return [self.name] + [r.requested for r in self.rules if r.requested and r.requested != self.name]

    def to_yaml(self) -> dict:
        out = {"router": self.type, "name": self.name, "models": list(self.models)}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.type == "cascade":
            out.update(signal=self.signal, top_logprobs=self.top_logprobs)
            if self.signal == "agreement":
                out.update(samples=self.samples, sample_temperature=self.sample_temperature)
        if self.type == "rules":
            out["rules"] = [{k: v for k, v in vars(r).items() if v is not None} for r in self.rules]
            if self.default is not None:
                out["default"] = self.default
        return {**out, **self.extra}


# ----- decisions (pure)

def choose_by_rules(spec: RouterSpec, text: str, prompt_tokens: int, requested: str) -> str:
    for rule in spec.rules:
        if rule.matches(text, prompt_tokens, requested):
            return rule.model
    return spec.default or spec.models[-1]


def choose_learned(spec: RouterSpec, p_small_good: float) -> str:
    """The small model when the classifier's probability reaches the threshold (0.5 when none is set)."""
    threshold = 0.5 if spec.threshold is None else spec.threshold
    return spec.models[0] if p_small_good >= threshold else spec.models[1]


def cascade_accepts(spec: RouterSpec, confidence: float) -> bool:
    """Keep an answer whose confidence reaches the threshold (-inf, an empty answer, never does)."""
    return confidence > -math.inf and confidence >= spec.threshold


# ----- reading and writing

def _fail(where: str, why: str) -> UserError:
    return UserError(f"{where}: {why}", param="router")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


def parse(data: object, where: str, path: str | None = None) -> RouterSpec:
    """A RouterSpec from a router file's YAML content; every mistake is a UserError naming the key."""
    if not isinstance(data, dict):
        raise _fail(where, "a router file is a YAML mapping with at least `router:` and `models:`")
    kind = data.get("router")
    if kind not in TYPES:
        raise _fail(where, f"router: must be one of {', '.join(TYPES)}, got {kind!r}")
    models = data.get("models")
    if not (isinstance(models, list) and models and all(isinstance(m, str) and m for m in models)):
        raise _fail(where, "models: a list of served model names, cheapest first")
    if len(set(models)) != len(models):
        raise _fail(where, f"models: names must differ, got {models}")
    need = {"cascade": 2, "learned": 2, "rules": 1}[kind]
    if len(models) < need or (kind == "learned" and len(models) != 2):
        raise _fail(where, f"models: a {kind} router needs {'exactly 2' if kind == 'learned' else f'at least {need}'}"
                    f" models, got {len(models)}")
    name = data.get("name", "auto")
    if not isinstance(name, str) or not _NAME.match(name) or name in models:
        raise _fail(where, f"name: letters, digits, '_', '.', ':' or '-', not one of the routed models; got {name!r}")
    known = {"router", "name", "models", "threshold", "signal", "samples", "sample_temperature", "top_logprobs",
             "rules", "default"}
    spec = RouterSpec(kind, tuple(models), name, path=path, extra={k: v for k, v in data.items() if k not in known})
    threshold = data.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise _fail(where, f"threshold: a number, got {threshold!r}")
    spec = replace(spec, threshold=None if threshold is None else float(threshold))
    if kind == "cascade":
        spec = _cascade(spec, data, where)
    elif kind == "rules":
        spec = _rules(spec, data, where)
    elif spec.threshold is not None and not 0 <= spec.threshold <= 1:
        raise _fail(where, f"threshold: a learned router's threshold is a probability in [0, 1], got {spec.threshold}")
    return spec


def _cascade(spec: RouterSpec, data: dict, where: str) -> RouterSpec:
    signal = data.get("signal", "mean_logprob")
    if signal not in SIGNALS:
        raise _fail(where, f"signal: one of {', '.join(SIGNALS)}, got {signal!r}")
    if spec.threshold is None:
        raise _fail(where, "threshold: a cascade needs one (`cairn router calibrate` picks it for a target share)")
    samples, temperature = data.get("samples", 3 if signal == "agreement" else 0), data.get("sample_temperature", 0.7)
    top = data.get("top_logprobs", 5)
    if not isinstance(samples, int) or not 0 <= samples <= 16 or (signal == "agreement" and samples < 1):
        raise _fail(where, f"samples: 1 to 16 extra answers for agreement (0 otherwise), got {samples!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise _fail(where, f"sample_temperature: in (0, 2], got {temperature!r}")
    if not isinstance(top, int) or not 1 <= top <= 20:
        raise _fail(where, f"top_logprobs: 1 to 20, got {top!r}")
    return replace(spec, signal=signal, samples=samples, sample_temperature=float(temperature), top_logprobs=top)


def _rules(spec: RouterSpec, data: dict, where: str) -> RouterSpec:
    raw = data.get("rules")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "rules: a list of rules, each a mapping with `model:` and conditions")
    rules = []
    for i, r in enumerate(raw):
        at = f"rules[{i}]"
        if not isinstance(r, dict) or r.get("model") not in spec.models:
            raise _fail(where, f"{at}: needs `model:`, one of {list(spec.models)}")
        unknown = set(r) - {"model", "max_prompt_tokens", "min_prompt_tokens", "regex", "requested"}
        if unknown:
            raise _fail(where, f"{at}: unknown keys {sorted(unknown)}; conditions are max_prompt_tokens, "
                        "min_prompt_tokens, regex and requested")
        for key in ("max_prompt_tokens", "min_prompt_tokens"):
            if key in r and (not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < 0):
                raise _fail(where, f"{at}.{key}: a token count, got {r[key]!r}")
        if "regex" in r:
            try:
                re.compile(str(r["regex"]))
            except re.error as e:
                raise _fail(where, f"{at}.regex: not a regular expression ({e})") from None
        if "requested" in r and (not isinstance(r["requested"], str) or not _NAME.match(r["requested"])
                                 or r["requested"] in spec.models):
            raise _fail(where, f"{at}.requested: a model name that is not one of the routed models, "
                        f"got {r['requested']!r}")
        rules.append(Rule(**{k: (str(v) if k == "regex" else v) for k, v in r.items()}))
    default = data.get("default")
    if default is not None and default not in spec.models:
        raise _fail(where, f"default: one of {list(spec.models)}, got {default!r}")
    return replace(spec, rules=tuple(rules), default=default)


def load(path: str | Path) -> RouterSpec:
    """A router from a YAML file or a directory with router.yaml."""
    p = Path(path)
    file = p / ROUTER_FILE if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{path}: no router here (a YAML file, or a directory with {ROUTER_FILE})", param="router")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _fail(str(file), f"not valid YAML ({str(e).splitlines()[0]})") from None
    spec = parse(data, str(file), str(p))
    if spec.type == "learned" and not (file.parent / CLASSIFIER_FILE).is_file():
        raise _fail(str(file), f"a learned router needs {CLASSIFIER_FILE} beside it (`cairn router train` writes both)")
    return spec


def save(spec: RouterSpec, path: str | Path) -> Path:
    """Write router.yaml into directory `path` (or to `path` itself when it names a .yaml file)."""
    from cairn.fsutil import atomic_write_text

    p = Path(path)
    file = p if p.suffix in (".yaml", ".yml") else p / ROUTER_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, yaml.safe_dump(spec.to_yaml(), sort_keys=False))
    return file

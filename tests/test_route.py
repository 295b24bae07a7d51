"""Routing: the pure parts against hand-computed values, then each router type serving two tiny models over HTTP
with decisions made deterministic by thresholds set from the models' own measured confidences and features."""

import json
import math

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cairn.cli import main
from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.errors import UserError
from cairn.route import commands as rcmd
from cairn.route import config as rc
from cairn.route import curve as cv
from cairn.route import signals
from cairn.route.learned import Classifier, auc
from cairn.route.learned import train as fit
from cairn.serve.app import create_app
from tests.test_serve import Server

# ----- signals


def test_signals_against_hand_computed_values():
    lps = [-0.1, -2.0, -0.3]
    assert signals.mean_logprob(lps) == pytest.approx(-0.8)
    assert signals.min_logprob(lps) == -2.0
    # top-2 of 0.5 and 0.25, the rest 0.25 as one outcome: 1.5 ln 2
    assert signals.top_entropy([math.log(0.5), math.log(0.25)]) == pytest.approx(1.5 * math.log(2))
    assert signals.top_entropy([0.0]) == pytest.approx(0.0)  # all mass on one token
    assert signals.neg_entropy([[0.0], [math.log(0.5), math.log(0.5)]]) == pytest.approx(-math.log(2) / 2)
    assert signals.agreement("Paris.", ["paris", " PARIS ", "Rome"]) == pytest.approx(2 / 3)
    assert signals.agreement("Paris", []) == 1.0
    for signal in signals.SIGNALS:  # an empty answer has no evidence for it
        assert signals.confidence(signal, [], [], "", ["x"]) == -math.inf
    with pytest.raises(ValueError, match="unknown confidence signal"):
        signals.confidence("vibes", lps, [], "a")


# ----- the curve


def test_curve_pgr_and_target_by_hand():
    # 4 items; the router ranks item 2 lowest, then 0, then 1 and 3 tied
    scores, qs, ql = [0.2, 0.9, 0.1, 0.9], [0, 1, 0, 1], [1, 1, 1, 0]
    c = cv.router_curve(scores, qs, ql)
    assert c.shares == (0.0, 0.25, 0.5, 1.0)  # the tied pair moves together
    assert c.qualities == (0.5, 0.75, 1.0, 0.75)
    assert c.at(0.375) == pytest.approx(0.875)
    assert c.least_share(0.95 * 0.75) == pytest.approx(0.25 * (0.7125 - 0.5) / 0.25)
    assert c.least_share(1.1) is None
    s = cv.summary(c, qs, ql, cost_small=1.0, cost_large=4.0, own_cost=0.1)
    assert s["quality_small"] == 0.5 and s["quality_large"] == 0.75
    assert s["pgr"]["50%"] == pytest.approx((1.0 - 0.5) / 0.25)
    need = s["share_for_target"]
    assert s["cost_for_target"] == pytest.approx(0.1 + (1 - need) * 1.0 + need * 4.0)
    assert s["margin_over_random"]["50%"] == pytest.approx(1.0 - 0.625)
    cascade = cv.summary(c, qs, ql, 1.0, 4.0, cascade=True)
    assert cascade["cost_for_target"] == pytest.approx(1.0 + need * 4.0)  # the small answer is always paid
    rand = cv.router_curve([0.5] * 4, qs, ql)  # no information: one step from small to large
    assert rand.at(0.5) == pytest.approx(cv.random_curve(qs, ql).at(0.5))


# ----- router files and decisions


def test_rules_decisions_table():
    spec = rc.parse({"router": "rules", "models": ["s", "l"], "rules": [
        {"regex": "(?i)prove", "model": "l"}, {"max_prompt_tokens": 10, "model": "s"},
        {"requested": "cheap", "model": "s"}]}, "r.yaml")
    assert spec.names() == ["auto", "cheap"]
    cases = [("Prove it", 3, "auto", "l"), ("hello", 3, "auto", "s"), ("hello", 50, "auto", "l"),
             ("hello", 50, "cheap", "s")]
    for text, n, requested, want in cases:
        assert rc.choose_by_rules(spec, text, n, requested) == want, (text, n, requested)
    learned = rc.parse({"router": "learned", "models": ["s", "l"], "threshold": 0.7}, "r.yaml")
    assert rc.choose_learned(learned, 0.7) == "s" and rc.choose_learned(learned, 0.69) == "l"
    cascade = rc.parse({"router": "cascade", "models": ["s", "m", "l"], "threshold": -1.0}, "r.yaml")
    assert rc.cascade_accepts(cascade, -1.0) and not rc.cascade_accepts(cascade, -1.01)
    assert rc.parse(yaml.safe_load(yaml.safe_dump(spec.to_yaml())), "again") == rc.replace(spec, path=None)


@pytest.mark.parametrize("data, why", [
    ([1, 2], "YAML mapping"),
    ({"router": "magic", "models": ["a", "b"]}, "router: must be one of"),
    ({"router": "cascade", "models": ["a"], "threshold": 0}, "at least 2"),
    ({"router": "cascade", "models": ["a", "b"]}, "threshold: a cascade needs one"),
    ({"router": "cascade", "models": ["a", "b"], "threshold": 0, "signal": "mood"}, "signal: one of"),
    ({"router": "learned", "models": ["a", "b", "c"]}, "exactly 2"),
    ({"router": "learned", "models": ["a", "b"], "threshold": 2}, "probability"),
    ({"router": "rules", "models": ["a", "b"], "rules": [{"model": "c"}]}, r"rules\[0\]: needs `model:`"),
    ({"router": "rules", "models": ["a"], "rules": [{"model": "a", "regex": "("}]}, "not a regular expression"),
    ({"router": "rules", "models": ["a"], "rules": [{"model": "a", "size": 3}]}, "unknown keys"),
    ({"router": "rules", "models": ["a"], "name": "a", "rules": [{"model": "a"}]}, "name:"),
    ({"router": "rules", "models": ["a"], "name": "x+rag", "rules": [{"model": "a"}]}, "name:"),
])
def test_bad_router_files_say_what_is_wrong(data, why):
    with pytest.raises(UserError, match=why):
        rc.parse(data, "r.yaml")


def test_threshold_for_share():
    scores = [0.1, 0.4, 0.2, 0.9, 0.5]
    for share in (0.0, 0.2, 0.6, 1.0):
        t = rcmd.threshold_for_share(scores, share)
        assert sum(s < t for s in scores) == round(share * len(scores))


# ----- the learned classifier


def test_classifier_learns_a_separable_rule_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g) * torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    labels = [int(v > 0) for v in (x[:, 0] - 0.5 * x[:, 2]).tolist()]
    clf, report = fit(x, labels)
    assert report["cv_auc"] > 0.95
    assert auc(clf.prob(x).tolist(), labels) > 0.98
    clf.save(tmp_path / "c.safetensors", {"k": "v"})
    again, meta = Classifier.load(tmp_path / "c.safetensors")
    assert meta == {"k": "v"} and torch.allclose(again.prob(x), clf.prob(x))
    with pytest.raises(UserError, match="both outcomes"):
        fit(x, [1] * 80)
    assert auc([0.1, 0.2, 0.2], [0, 1, 0]) == pytest.approx(0.75)


def test_routing_data_forms_and_their_scores(tmp_path):
    lines = [{"prompt": "a", "scores": {"s": 0.2, "l": 0.9}}, {"messages": [{"role": "user", "content": "b"}],
             "winner": "s"}, {"prompt": "c", "winner": "tie"}, {"prompt": "d", "answer": ["Paris"]}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    items = rcmd.read_items(f)
    small = rcmd.Answers(["", "", "", "It is Paris."], [], [])
    large = rcmd.Answers(["", "", "", "Rome"], [], [])
    assert rcmd.qualities(items, ("s", "l"), small, large) == ([0.2, 1.0, 0.5, 1.0], [0.9, 0.0, 0.5, 0.0])
    with pytest.raises(UserError, match="winner 'x'"):
        rcmd.qualities([rcmd.RouteItem(prompt="a", winner="x")], ("s", "l"), None, None)
    with pytest.raises(UserError, match="no entry for"):
        rcmd.qualities([rcmd.RouteItem(prompt="a", scores={"s": 1})], ("s", "l"), None, None)
    with pytest.raises(UserError, match="--judge"):
        rcmd.qualities([rcmd.RouteItem(prompt="a")], ("s", "l"), small, large)
    f.write_text('{"prompt": "a"}\n{"answer": "x"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: .*exactly one of prompt or messages"):
        rcmd.read_items(f)


# ----- serving: two tiny models sharing a tokenizer


@pytest.fixture(scope="module")
def pair(model_factory):
    cfg = EngineConfig(max_seqs=8, max_context=256, max_queue=64)
    with LLM(model_factory("llama"), cfg) as small, LLM(model_factory("llama-untied"), cfg) as large:
        yield small, large


CHAT = [{"role": "user", "content": "hello there"}]


def greedy(llm, messages, max_tokens=6, logprobs=None):
    return llm.submit(llm.render_chat(messages), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                 logprobs=logprobs)).result()


def serve(pair, tmp_path, router: dict, classifier: Classifier | None = None):
    d = tmp_path / router.get("name", "auto")
    d.mkdir(exist_ok=True)
    if classifier is not None:
        classifier.save(d / rc.CLASSIFIER_FILE, {})
    rc.save(rc.parse(router, "test"), d)
    return Server(create_app({"small": pair[0], "large": pair[1]}, routers=[rc.load(d)]))


def ask(server, messages=CHAT, stream=False, model="auto", **kw):
    body = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0, "stream": stream, **kw}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def streamed_text(r) -> str:
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert all(c["model"] == chunks[0]["model"] for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def metric(server, name, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_cascade_keeps_a_confident_answer_and_escalates_an_unsure_one(pair, tmp_path):
    small, large = pair
    mine = greedy(small, CHAT, logprobs=5)
    conf = signals.mean_logprob([lp.logprob for lp in mine.logprobs])
    theirs = greedy(large, CHAT)
    for threshold, want, text in ((conf - 1e-3, "small", mine.text), (conf + 1e-3, "large", theirs.text)):
        s = serve(pair, tmp_path, {"router": "cascade", "models": ["small", "large"], "threshold": threshold})
        try:
            models = httpx.get(s.url + "/v1/models").json()["data"]
            assert {(m["id"], m["owned_by"]) for m in models} >= {("auto", "cairn-router"), ("small", "cairn")}
            r = ask(s)
            assert r.status_code == 200 and r.json()["model"] == want and r.headers["x-cairn-model"] == want
            assert r.headers["x-cairn-router"] == "auto"
            assert r.json()["choices"][0]["message"]["content"] == text
            assert "logprobs" not in r.json()["choices"][0] or r.json()["choices"][0]["logprobs"] is None
            st = ask(s, stream=True)
            assert st.headers["x-cairn-model"] == want and streamed_text(st) == text  # only the accepted answer
            assert metric(s, "cairn_route_requests_total", router="auto", model=want, status="200") == 2
            escalated = metric(s, "cairn_route_escalations_total", router="auto", model="small")
            assert escalated == (2 if want == "large" else 0)
            assert metric(s, "cairn_route_tokens_total", router="auto", model="small", kind="completion") == 2 * len(
                mine.token_ids)
            assert metric(s, "cairn_route_seconds_total", router="auto", model=want) > 0
            direct = ask(s, model="small")  # the real names still answer directly
            assert direct.json()["model"] == "small" and direct.headers["x-cairn-model"] == "small"
        finally:
            s.stop()


def test_cascade_logprobs_are_what_the_client_asked(pair, tmp_path):
    s = serve(pair, tmp_path, {"router": "cascade", "models": ["small", "large"], "threshold": -1e9,
                               "top_logprobs": 5})
    try:
        r = ask(s, logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]["content"]
        assert r and all(len(t["top_logprobs"]) == 2 for t in r)
        c = httpx.post(s.url + "/v1/completions", json={"model": "auto", "prompt": "the", "max_tokens": 4,
                                                          "temperature": 0}, timeout=60).json()
        assert c["model"] == "small" and c["choices"][0]["logprobs"] is None
    finally:
        s.stop()


def test_agreement_cascade_compares_samples(pair, tmp_path):
    # tiny random models at temperature 2 never agree with their greedy answer over 6 tokens: always escalated
    s = serve(pair, tmp_path, {"router": "cascade", "models": ["small", "large"], "threshold": 0.5,
                               "signal": "agreement", "samples": 3, "sample_temperature": 2.0})
    try:
        assert ask(s, seed=1).json()["model"] == "large"
    finally:
        s.stop()


def test_learned_router_sends_each_prompt_where_its_features_point(pair, tmp_path):
    small, _ = pair
    a, b = [{"role": "user", "content": "tell me a story"}], [{"role": "user", "content": "solve 17 * 23"}]
    fa, fb = (small.prompt_features(small.render_chat(m)) for m in (a, b))
    w = fa - fb
    d = w.shape[0]
    clf = Classifier(w, -(w @ (fa + fb)) / 2, torch.zeros(d), torch.ones(d))  # a above 0.5, b below
    assert clf.prob(fa) > 0.5 > clf.prob(fb)
    s = serve(pair, tmp_path, {"router": "learned", "models": ["small", "large"]}, clf)
    try:
        assert ask(s, a).json()["model"] == "small"
        assert ask(s, b).json()["model"] == "large"
        assert ask(s, b, stream=True).headers["x-cairn-model"] == "large"
        assert metric(s, "cairn_route_decision_seconds_total", router="auto") > 0
    finally:
        s.stop()


def test_rules_router_by_length_regex_and_requested_alias(pair, tmp_path):
    s = serve(pair, tmp_path, {"router": "rules", "models": ["small", "large"], "default": "large", "rules": [
        {"regex": "(?i)\\bprove\\b", "model": "large"}, {"requested": "cheap", "model": "small"},
        {"max_prompt_tokens": 40, "model": "small"}]})
    try:
        ids = httpx.get(s.url + "/v1/models").json()["data"]
        assert {"auto", "cheap"} <= {m["id"] for m in ids}
        assert ask(s, [{"role": "user", "content": "hi"}]).json()["model"] == "small"
        assert ask(s, [{"role": "user", "content": "Prove it"}]).json()["model"] == "large"
        assert ask(s, [{"role": "user", "content": "word " * 60}]).json()["model"] == "large"
        assert ask(s, [{"role": "user", "content": "word " * 60}], model="cheap").json()["model"] == "small"
    finally:
        s.stop()


def test_routers_for_models_not_served_are_refused(pair, tmp_path):
    spec = rc.parse({"router": "cascade", "models": ["small", "big"], "threshold": 0}, "r.yaml")
    with pytest.raises(UserError, match=r"\['big'\] is not served"):
        create_app({"small": pair[0], "large": pair[1]}, routers=[spec])
    clash = rc.parse({"router": "rules", "models": ["small"], "name": "large", "rules": [{"model": "small"}]}, "r")
    with pytest.raises(UserError, match="already a served model's name"):
        create_app({"small": pair[0], "large": pair[1]}, routers=[clash])


# ----- the commands


def test_serve_refuses_bad_routers_with_exit_2(model_factory, tmp_path, capsys):
    small, large = str(model_factory("llama")), str(model_factory("llama-untied"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("router: cascade\nmodels: [a, b]\nthreshold: 0\n")
    assert main(["serve", small, large, "--router", str(bad)]) == 2
    assert "['a', 'b'] are not served" in capsys.readouterr().err
    (tmp_path / "junk.yaml").write_text("router: [unclosed\n")
    assert main(["serve", small, large, "--router", str(tmp_path / "junk.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    other = tmp_path / "other"  # a learned router trained for a small model of another width
    other.mkdir()
    Classifier(torch.zeros(10), torch.tensor(0.0), torch.zeros(10), torch.ones(10)).save(other / rc.CLASSIFIER_FILE, {})
    rc.save(rc.parse({"router": "learned", "models": ["s", "l"]}, "x"), other)
    assert main(["serve", small, large, "--served-name", "s", "--served-name", "l", "--router", str(other)]) == 2
    assert "a router file for other models" in capsys.readouterr().err
    fits = tmp_path / "fits"  # a learned router needs the small model in this process: refused with --pool
    fits.mkdir()
    width = 2 * json.loads((model_factory("llama") / "config.json").read_text())["hidden_size"]
    Classifier(torch.zeros(width), torch.tensor(0.0), torch.zeros(width), torch.ones(width)).save(
        fits / rc.CLASSIFIER_FILE, {})
    rc.save(rc.parse({"router": "learned", "models": ["s", "l"]}, "x"), fits)
    assert main(["serve", small, large, "--served-name", "s", "--served-name", "l", "--router", str(fits),
                 "--pool", "127.0.0.1:9"]) == 2
    assert "which --pool does not offer" in capsys.readouterr().err
    assert main(["router", "train", "--data", str(tmp_path / "none.jsonl"), "--models", small, large,
                 "--out", str(tmp_path / "r")]) == 2


def test_train_calibrate_and_eval_from_the_command_line(model_factory, tmp_path, capsys):
    small, large = str(model_factory("llama")), str(model_factory("llama-untied"))
    topics = ["cats", "rivers", "music", "bread", "stars", "trains", "snow", "gardens", "paint", "ships"]
    lines = []
    for i, t in enumerate(topics * 2):  # the small model does on stories, not on sums
        story = i % 2 == 0
        prompt = f"Write a short story about {t}." if story else f"What is {i + 3} plus {2 * i + 5}?"
        lines.append({"prompt": prompt, "scores": {"s": 1.0 if story else 0.0, "l": 1.0}})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "learned"
    assert main(["router", "train", "--data", str(data), "--models", small, large, "--names", "s", "l",
                 "--out", str(out)]) == 0
    trained = yaml.safe_load((out / "router.yaml").read_text())
    assert trained["router"] == "learned" and trained["trained"]["items"] == 20
    spec = rc.load(out)
    with LLM(small, EngineConfig(max_seqs=4)) as llm:
        items = rcmd.read_items(data)
        p = rcmd.router_scores(spec, llm, items, None, 8)
    assert auc(p, [int(x["scores"]["s"] >= 1.0) for x in lines]) == 1.0  # separates what it was trained on
    assert main(["router", "calibrate", str(out), "--data", str(data), "--model", small, "--share", "0.25",
                 "--out", str(tmp_path / "cal")]) == 0
    assert "sends 25.0% of 20 prompts" in capsys.readouterr().out
    cascade = tmp_path / "cascade.yaml"
    cascade.write_text("router: cascade\nmodels: [s, l]\nthreshold: -3\nsignal: min_logprob\n")
    answers = tmp_path / "answers.jsonl"  # scored by answers: both tiny models are wrong, so quality is 0 for both
    answers.write_text("\n".join(json.dumps({"prompt": x["prompt"], "answer": "zebra"}) for x in lines))
    res = tmp_path / "ev.json"
    assert main(["router", "eval", str(tmp_path / "cal"), str(cascade), "--data", str(data), "--models", small, large,
                 "--names", "s", "l", "--cost-items", "2", "--max-tokens", "4", "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["quality"] == {"s": 0.5, "l": 1.0} and (tmp_path / "ev.png").stat().st_size > 0
    learned, casc = r["routers"]
    assert learned["curve"]["qualities"][0] == 0.5 and learned["curve"]["qualities"][-1] == 1.0
    assert learned["pgr"]["50%"] == pytest.approx(1.0) and learned["share_for_target"] <= 0.5
    assert learned["own_seconds_per_request"] > 0 and casc["type"] == "cascade"
    assert "PGR@50%" in capsys.readouterr().out
    assert main(["router", "eval", str(cascade), "--data", str(answers), "--models", small, large,
                 "--names", "a", "b", "--out", str(res)]) == 2  # the router is for s and l


def test_router_features_are_the_hidden_states_transformers_computes(tiny_model):
    """prompt_features reads the hidden states after the first k blocks (all blocks: after the final norm), as
    transformers' output_hidden_states gives them (whose last entry is the normalised one)."""
    from transformers import AutoModelForCausalLM

    ids = [1, 5, 9, 2, 7, 3]
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    with torch.no_grad():
        states = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states  # embeddings, then each block
    with LLM(tiny_model, EngineConfig(max_seqs=2)) as llm:
        assert len(states) == 3  # the tiny model has two blocks
        for k in (0, 1):  # the embeddings, after the first block
            h = states[k][0]
            torch.testing.assert_close(llm.prompt_features(ids, k), torch.cat([h.mean(0), h[-1]]), atol=1e-4,
                                       rtol=1e-4)
        last = states[-1][0]  # transformers applies the final norm to the last entry
        torch.testing.assert_close(llm.prompt_features(ids), torch.cat([last.mean(0), last[-1]]), atol=1e-4,
                                   rtol=1e-4)

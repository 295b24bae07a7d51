"""Property test: no request body, however malformed, produces a 5xx; every answer is a completion or a 4xx in
OpenAI's error shape."""

import json
import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cairn.config import EngineConfig
from cairn.engine.api import LLM
from cairn.serve.app import create_app

EXAMPLES = int(os.environ.get("CAIRN_FUZZ_EXAMPLES", "150"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=8)
small_ints = st.integers(-5, 40)
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), values),
                                 "content": st.one_of(st.text(max_size=30), values)})
fields = {
    "model": st.one_of(st.just("tiny"), values),
    "messages": st.one_of(st.lists(message, max_size=3), values),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 600), max_size=5), values),
    "max_tokens": st.one_of(small_ints, values),
    "max_completion_tokens": st.one_of(small_ints, values),
    "temperature": st.one_of(st.floats(-1, 3), values),
    "top_p": st.one_of(st.floats(-0.5, 1.5), values),
    "n": st.one_of(st.integers(-1, 4), values),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), values),
    "seed": st.one_of(st.integers(-(2**65), 2**65), values),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 7), values),
    "top_logprobs": st.one_of(st.integers(-1, 25), values),
    "stream": st.one_of(st.booleans(), values),
    "presence_penalty": st.one_of(st.floats(-3, 3), values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), values),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-2, 600).map(str), st.text(max_size=3)),
                                            st.floats(-150, 150), max_size=3), values),
    "echo": st.one_of(st.booleans(), values),
    "best_of": st.one_of(st.integers(-1, 5), values),
    "suffix": st.one_of(st.just(""), st.text(max_size=3), values),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}),
                                 values),
    "tools": st.one_of(st.just([]), values),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), values),
}
bodies = st.one_of(st.fixed_dictionaries({}, optional=fields), values)


@pytest.fixture(scope="module")
def tc(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=128)) as llm, TestClient(create_app({"tiny": llm})) as c:
        yield c


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_malformed_bodies_get_a_completion_or_a_4xx_never_a_5xx(tc, body, path):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 40:
        body["max_tokens"] = 40
    # json.dumps writes NaN/Infinity literals, which Python's parser on the server accepts: the schema must refuse them.
    r = tc.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400, 404), r.text  # 404: a model name that is not "tiny"
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        assert r.json()["choices"] and r.json()["usage"]["completion_tokens"] >= 1


part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
common = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "seed": st.integers(0, 2**40),
    "presence_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 600).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
plausible = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "system", "assistant", "developer"]),
            "content": st.one_of(st.text(max_size=30), st.lists(part, min_size=1, max_size=2))}), min_size=1, max_size=3)},
        optional={**common, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
                  "response_format": st.just({"type": "text"}), "tool_choice": st.just("none")}),
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 511), min_size=1, max_size=5),
                             st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2))},
        optional={**common, "logprobs": st.integers(0, 5), "echo": st.booleans(), "best_of": st.integers(1, 4)}),
}


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), path=st.sampled_from(sorted(plausible)))
def test_well_formed_bodies_get_a_completion_or_a_400_naming_the_param(tc, data, path):
    body = {"model": "tiny", **data.draw(plausible[path])}
    r = tc.post(path, json=body)
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"], r.text
    elif body.get("stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        choices = r.json()["choices"]
        assert len(choices) == body.get("n", 1) * (len(body["prompt"]) if isinstance(body.get("prompt"), list)
                                                   and isinstance(body["prompt"][0], str) else 1)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "tiny", "prompt": "x"' * 3])
def test_raw_garbage_is_400(tc, raw):
    r = tc.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()

"""Property test: no request body, however malformed, produces a 5xx; errors always carry OpenAI's shape."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cairn.config import EngineConfig  # noqa: E402
from cairn.engine.api import LLM  # noqa: E402
from cairn.serve.app import create_app  # noqa: E402

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
}
bodies = st.one_of(st.fixed_dictionaries({}, optional=fields), values)


@pytest.fixture(scope="module")
def tc(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=128)) as llm:
        with TestClient(create_app({"tiny": llm})) as c:
            yield c


@settings(max_examples=int(__import__("os").environ.get("CAIRN_FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_body_gives_5xx(tc, body, path):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 40:
        body["max_tokens"] = 40
    # json.dumps writes NaN/Infinity literals, which Python's parser on the server accepts: the schema must refuse them.
    r = tc.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "tiny", "prompt": "x"' * 3])
def test_raw_garbage_is_400(tc, raw):
    r = tc.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()

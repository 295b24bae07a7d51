"""The OpenAI-compatible server through the official `openai` client (raw httpx where the client cannot say it),
on 127.0.0.1 only."""

import asyncio
import json
import logging
import random
import shutil
import socket
import string
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.errors import CapacityError
from cairn.serve.app import create_app
from cairn.serve.protocol import Message

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def openai_module():
    """The official client, for the tests that use it (the others run without it)."""
    return pytest.importorskip("openai")


class Server:
    """uvicorn in a thread on a free loopback port; stopped by the fixture."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=8, max_context=512, max_queue=64)) as m:
        yield m


@pytest.fixture(scope="module")
def server(llm):
    s = Server(create_app({"tiny": llm}, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai_module().OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60, **kw)


def alone(llm, prompt_ids, max_tokens):
    return llm.submit(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)).result()


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "models": ["tiny"]}


def test_chat_matches_engine_and_streams_the_same_text(client, llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cairn?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ref = llm.chat(msgs, SamplingParams(max_tokens=12, temperature=0)).result()
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason


def test_completion_stop_seed_usage_and_logprobs(client, llm):
    ids = llm.encode_prompt("The river")
    ref = alone(llm, ids, 16)
    r = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0, extra_body={})
    assert r.usage.prompt_tokens == len(ids)
    stop = ref.text[3:6]
    s = client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == ref.text[: ref.text.find(stop)]
    a, b = (client.completions.create(model="tiny", prompt="The river", max_tokens=16, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    lp = client.completions.create(model="tiny", prompt="The river", max_tokens=5, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == lp.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top token


def test_n_choices(client):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, n=3, temperature=1.0, seed=1,
                                       extra_body={"ignore_eos": True})
    one = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == one.usage.prompt_tokens


def test_errors_are_typed_openai_errors(client, server):
    openai = openai_module()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=7)
    assert e.value.body["param"] == "temperature"
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_queue_full_gives_429_with_retry_after(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=1, max_context=512, max_queue=1)) as m:
        s = Server(create_app({"tiny": m}))
        try:
            hog = m.submit("a", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
            next(iter(hog))  # holds the only slot
            queued = m.submit("b", SamplingParams(max_tokens=4))  # fills the queue
            r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "c", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            hog.cancel()
            assert queued.result().finish_reason in ("length", "stop")
        finally:
            s.stop()


def test_32_concurrent_streams_are_independent(server, llm):
    prompts = [f"{i} plus {i + 3} is" for i in range(32)]
    want = [alone(llm, llm.encode_prompt(p), 20).text for p in prompts]
    aclient = openai_module().AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(p):
        stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    got = asyncio.run(main())
    assert got == want


def test_client_disconnect_cancels_and_frees_slot(server, llm):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines)
        assert llm.stats()["running"] >= 1
    deadline = time.monotonic() + 15
    while llm.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert llm.stats() == {"waiting": 0, "running": 0}


def scrape(server) -> dict:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_count_what_the_requests_did(server, client):
    before = scrape(server)
    a = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
                                       temperature=1.0, seed=3)
    with pytest.raises(openai_module().NotFoundError):
        client.completions.create(model="nope", prompt="x")
    after = scrape(server)
    assert delta(before, after, "cairn_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta(before, after, "cairn_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta(before, after, "cairn_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    generated = a.usage.completion_tokens + b.usage.completion_tokens
    assert delta(before, after, "cairn_generation_tokens_total", model="tiny") == generated == 3 + b.usage.completion_tokens
    # prompt tokens are counted per sequence run (the chat's prompt ran twice, for n=2)
    assert delta(before, after, "cairn_prompt_tokens_total", model="tiny") == a.usage.prompt_tokens + 2 * b.usage.prompt_tokens
    assert delta(before, after, "cairn_time_to_first_token_seconds_count", model="tiny") == 3  # one per sequence
    assert delta(before, after, "cairn_inter_token_latency_seconds_count", model="tiny") == generated - 3
    assert after[("cairn_running_sequences", (("model", "tiny"),))] == 0


def test_unknown_paths_share_one_metrics_series(server):
    before = {k for k in scrape(server) if k[0] == "cairn_requests_total"}
    for _ in range(50):
        path = "/" + "".join(random.choices(string.ascii_lowercase, k=12))
        assert httpx.get(server.url + path).status_code == 404
    after = {k for k in scrape(server) if k[0] == "cairn_requests_total"}
    assert after - before <= {("cairn_requests_total", (("endpoint", "other"), ("status", "404")))}
    assert not any("/" in dict(k[1])["endpoint"] and dict(k[1])["endpoint"] not in
                   ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics", "/openapi.json")
                   for k in after)


def test_health_is_503_while_loading(tiny_model):
    from fastapi.testclient import TestClient

    gate = threading.Event()

    def loader():
        gate.wait(30)
        return {"tiny": LLM(tiny_model, EngineConfig(max_seqs=1))}

    app = create_app(loader=loader)
    with TestClient(app) as tc:
        assert tc.get("/health").status_code == 503
        r = tc.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        app.state.cairn["models"]["tiny"].close()


# ----- the OpenAPI document


def resolve(doc, schema):
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_openapi_describes_requests_responses_and_errors(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    paths = doc["paths"]
    fields = {
        "/v1/chat/completions": {"messages", "model", "logit_bias", "max_completion_tokens", "max_tokens", "n", "stop",
                                 "seed", "temperature", "top_p", "logprobs", "top_logprobs", "response_format",
                                 "tools", "tool_choice", "stream", "stream_options", "user", "store"},
        "/v1/completions": {"prompt", "model", "logit_bias", "echo", "best_of", "suffix", "logprobs", "max_tokens",
                            "n", "stream"},
    }
    for path, want in fields.items():
        op = paths[path]["post"]
        body = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
        assert want <= set(body["properties"]), want - set(body["properties"])
        assert {"model"} <= set(body["required"])
        ok = op["responses"]["200"]["content"]
        assert {"choices", "usage", "id", "model"} <= set(resolve(doc, ok["application/json"]["schema"])["properties"])
        assert "choices" in resolve(doc, ok["text/event-stream"]["schema"])["properties"]
        assert "422" not in op["responses"]
        for status in ("400", "401", "404", "413", "429", "500", "503"):
            err = resolve(doc, op["responses"][status]["content"]["application/json"]["schema"])
            detail = resolve(doc, err["properties"]["error"])
            assert set(detail["properties"]) == {"message", "type", "param", "code"}
    message = resolve(doc, resolve(doc, paths["/v1/chat/completions"]["post"]["requestBody"]["content"]
                                   ["application/json"]["schema"])["properties"]["messages"]["items"])
    assert {"role", "content"} <= set(message["properties"])
    models = resolve(doc, paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert resolve(doc, models["properties"]["data"]["items"])["properties"].keys() >= {"id", "object", "owned_by"}


# ----- messages


QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def default_system_llm(tiny_model, tmp_path_factory):
    """The tiny model with a chat template that adds a system prompt when the conversation has none."""
    path = tmp_path_factory.mktemp("qwen-like") / "m"
    shutil.copytree(tiny_model, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN_LIKE}))
    with LLM(path, EngineConfig(max_seqs=2, max_context=512)) as m:
        yield m


def test_developer_role_is_the_system_role(default_system_llm):
    llm = default_system_llm

    def rendered(role):
        msgs = [Message(role=role, content="Answer in French."), Message(role="user", content="hi")]
        return llm.render_chat([m.for_template() for m in msgs])

    raw = llm.render_chat([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "hi"}])
    assert rendered("developer") == rendered("system") != raw  # unmapped, the template adds its default system prompt
    with TestClient(create_app({"t": llm})) as tc:
        def ask(role):
            body = {"model": "t", "messages": [{"role": role, "content": "Answer in French."},
                                               {"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
            r = tc.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        dev, system = ask("developer"), ask("system")
        same = ("prompt_tokens", "completion_tokens", "total_tokens")  # the second may find the prompt cached
        assert [dev["usage"][k] for k in same] == [system["usage"][k] for k in same]
        assert dev["usage"]["prompt_tokens"] == len(rendered("system"))
        assert dev["choices"][0]["message"] == system["choices"][0]["message"]


def test_text_parts_work_for_every_role_and_other_parts_are_refused(client, server):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cairn?"},
             {"role": "assistant", "content": "A pile."}, {"role": "user", "content": "More."}]
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in plain]
    a, b = (client.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0) for m in (plain, parts))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "f"}}):
        msgs = [plain[0], {"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
        r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages[1].content", r.text
        assert part["type"] in err["message"] and "text" in err["message"]


# ----- every OpenAI field: honoured, harmless, or refused by name


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "function_call", {"name": "f"}),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "reasoning_effort", "low"),
    ("/v1/chat/completions", "verbosity", "low"),
    ("/v1/chat/completions", "moderation", {}),
    ("/v1/chat/completions", "store", True),
    ("/v1/chat/completions", "logit_bias", {"9999999": 1}),
    ("/v1/chat/completions", "logit_bias", {"5": 101}),
    ("/v1/chat/completions", "logit_bias", {"the": 1}),
    ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/completions", "suffix", "and so on"),
    ("/v1/completions", "best_of", 1),
    ("/v1/completions", "logit_bias", {"512": -5}),
])
def test_fields_cairn_cannot_honour_are_refused_by_name(server, path, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value, **({"n": 2} if field == "best_of" else {}),
            **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})}
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value, param", [
    ("messages", [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}],
     "messages[0].tool_calls"),
    ("messages", [{"role": "tool", "content": "42", "tool_call_id": "c"}], "messages[0].role"),
])
def test_tool_messages_are_refused_by_name(server, field, value, param):
    r = post(server, "/v1/chat/completions", {"model": "tiny", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_harmless_and_empty_fields_are_accepted(client, server):
    msgs = [{"role": "user", "content": "hi"}]
    want = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    got = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0, response_format={"type": "text"}, tools=[],
        tool_choice="none", parallel_tool_calls=False, user="u1", metadata={"k": "v"}, store=False,
        service_tier="auto", modalities=["text"], prompt_cache_key="c", safety_identifier="s",
        extra_body={"some_vendor_field": 1, "functions": [], "function_call": "auto"})
    assert got.choices[0].message.content == want.choices[0].message.content
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "suffix": "", "user": "u",
                                         "best_of": 1, "echo": False, "unknown_vendor_field": [1]})
    assert r.status_code == 200, r.text


def test_logit_bias_steers_greedy_and_sampled_tokens(client, llm):
    ids = llm.encode_prompt("The river")
    top = alone(llm, ids, 1).token_ids[0]
    banned = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                                       logit_bias={str(top): -100})
    assert banned.choices[0].logprobs is None
    assert llm.encode_prompt(banned.choices[0].text) != [top]
    forced = 7 if top != 7 else 8
    for temperature in (0, 1.0):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=temperature, seed=1,
                                      logit_bias={str(forced): 100}, logprobs=0, extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        assert [llm.encode_prompt(t) for t in lp.tokens] == [[forced]] * 4, lp.tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logit_bias={str(forced): 100}, logprobs=True,
                                          extra_body={"ignore_eos": True})
    assert [c.token for c in chat.choices[0].logprobs.content] == [llm.tokenizer.decode([forced])] * 3


# ----- completions: prompt forms, echo, best_of


def test_prompt_forms_give_prompt_major_choices(client, llm):
    texts = ["The river", "A cairn is"]
    ids = [llm.encode_prompt(t) for t in texts]
    want = [alone(llm, i, 5).text for i in ids]
    for prompt in (texts, ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
        assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 20
    for prompt in (texts[1], ids[1]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [want[1]]


def test_echo_with_logprobs_scores_the_prompt_as_generation_did(client, llm):
    ids = llm.encode_prompt("The river")
    gen = llm.submit(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)).result()
    full = ids + gen.token_ids
    r = client.completions.create(model="tiny", prompt=full, max_tokens=1, temperature=0, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(llm.tokenizer.decode(full, skip_special_tokens=False))
    assert len(lp.tokens) == len(full) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the prompt's last 4 tokens were generated with KV-cached steps: the cache-free scoring pass agrees
    assert lp.token_logprobs[len(ids):len(full)] == pytest.approx([x.logprob for x in gen.logprobs], abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = client.completions.create(model="tiny", prompt="The river", max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith("The river") and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model="tiny", prompt="The river", max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_best_of_returns_the_n_with_the_highest_cumulative_logprob(client, llm, server):
    kw = {"model": "tiny", "prompt": "The river", "max_tokens": 6, "temperature": 1.0, "seed": 11,
          "extra_body": {"ignore_eos": True}}
    all4 = client.completions.create(n=4, logprobs=0, **kw)
    ranked = sorted(all4.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 24  # all four were generated
    for bad in ({"n": 3, "best_of": 2}, {"n": 1, "best_of": 2, "stream": True}):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


# ----- limits, logging, failures


def test_body_limit_is_413_by_header_and_by_streamed_length(llm):
    with TestClient(create_app({"tiny": llm}, max_body_bytes=2000)) as tc:
        big = json.dumps({"model": "tiny", "prompt": "x" * 3000}).encode()
        r = tc.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = tc.post("/v1/completions", content=iter([big[:1000], big[1000:]]),
                    headers={"content-type": "application/json"})  # chunked: no Content-Length
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
        r = tc.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200


def test_requests_are_logged_without_the_key(llm, caplog):
    caplog.set_level(logging.INFO, logger="cairn.serve")
    with TestClient(create_app({"tiny": llm}, api_key=KEY)) as tc:  # returns once the app is done, log line included
        client = openai_module().OpenAI(base_url=str(tc.base_url) + "/v1", api_key=KEY, max_retries=0, http_client=tc)
        r = client.with_raw_response.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0,
                                                        extra_body={"ignore_eos": True})
    rid = r.headers["x-request-id"]
    assert r.parse().id == f"cmpl-{rid}"
    rec = next(rec for rec in caplog.records if rid in rec.getMessage())
    assert rec.request == {**rec.request, "id": rid, "method": "POST", "route": "/v1/completions", "model": "tiny",
                           "status": 200, "completion_tokens": 3}
    assert rec.request["prompt_tokens"] > 0 and rec.request["latency_ms"] > 0
    assert "/v1/completions" in rec.getMessage() and "status=200" in rec.getMessage()
    assert not any(KEY in rec.getMessage() or KEY in str(rec.__dict__) for rec in caplog.records)


def test_failures_are_500s_in_openai_shape_with_a_logged_traceback(llm, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="cairn.serve")

    def broken_template(messages):
        raise ZeroDivisionError("template bug")

    def broken_device(chunks, rows):
        raise RuntimeError("device on fire")

    def capacity_gone(chunks, rows):
        raise CapacityError("the pool lost the devices holding this model")

    with TestClient(create_app({"tiny": llm})) as tc:
        monkeypatch.setattr(llm, "render_chat", broken_template)
        r = tc.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers["x-request-id"] in r.json()["error"]["message"]
        failed = [rec for rec in caplog.records if rec.exc_info and rec.exc_info[0] is ZeroDivisionError]
        assert failed and "template bug" in caplog.text and "Traceback" in caplog.text
        monkeypatch.setattr(llm.runner, "submit", broken_device)
        r = tc.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert any(rec.exc_info and rec.exc_info[0] is RuntimeError for rec in caplog.records)
        monkeypatch.setattr(llm.runner, "submit", capacity_gone)
        r = tc.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "insufficient_capacity"

"""The OpenAI-compatible server through the official `openai` client, on 127.0.0.1 only."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

openai = pytest.importorskip("openai")

from cairn.config import EngineConfig, SamplingParams  # noqa: E402
from cairn.engine.api import LLM  # noqa: E402
from cairn.serve.app import create_app  # noqa: E402

KEY = "test-key"


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
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


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
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

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


def test_metrics_exposed(server, client):
    client.completions.create(model="tiny", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ["cairn_requests_total", "cairn_prompt_tokens_total", "cairn_generation_tokens_total",
                 "cairn_time_to_first_token_seconds_bucket", "cairn_inter_token_latency_seconds_bucket",
                 "cairn_queue_depth", "cairn_running_sequences"]:
        assert name in text


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

"""The paged KV cache through the engine: outputs with a small pool (preemption), with shared prefixes (prefix
cache), under chunked prefill, cancellation, steps in flight and sliding windows equal outputs without; memory that
grows with use; cached prompt tokens reported through the server."""

import json
import threading

import pytest
import torch

from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.errors import ContextLengthError

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=1,
                        repetition_penalty=1.2)
PROMPTS = [list(range(3, 3 + n)) for n in (5, 37, 70, 16, 33, 120)]  # 16 and 33: block edges


def block_bytes(model_dir) -> int:
    cfg = ModelConfig.from_hf_dir(model_dir)
    return 2 * cfg.num_layers * cfg.kv_size * 16 * 4


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Every slot a whole context, no prefix cache: the behaviour before paging."""
    with LLM(tiny_model, EngineConfig(max_seqs=3, max_batch_tokens=8, max_context=256, prefix_caching=False)) as m:
        yield m


def want(reference, prompts, params):
    return [reference.submit(p, sp).result() for p in prompts for sp in params]


def same(got, expected):
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for g, w in zip(got, expected):  # batches differ, so float sums differ in the last bits
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)


@pytest.mark.parametrize("caching", [False, True])
def test_small_pool_preempts_and_outputs_are_unchanged(tiny_model, reference, caching):
    """A pool of 16 blocks (one context) for 4 slots: prompts of 5-120 tokens prefilled in 8-token chunks, greedy
    and seeded sampling with penalties; running sequences are preempted and resumed, with the same tokens."""
    expected = want(reference, PROMPTS, (GREEDY, SEEDED))
    config = EngineConfig(max_seqs=4, max_batch_tokens=8, max_context=256, kv_memory=16 * block_bytes(tiny_model),
                          prefix_caching=caching)
    with LLM(tiny_model, config) as m:
        assert m.engine.blocks.num_blocks == 16 and m.engine.max_context == 256
        got = [h.result() for h in [m.submit(p, sp) for p in PROMPTS for sp in (GREEDY, SEEDED)]]
        stats = m.kv_stats()
    same(got, expected)
    assert stats["preemptions"] > 0
    assert stats["blocks_used"] == 0 and stats["blocks_free"] + stats["blocks_cached"] == 16
    assert (stats["blocks_cached"] > 0) == caching


def test_every_request_that_fits_alone_finishes(tiny_model, reference):
    """Four requests that each need almost the whole pool, submitted together: they take turns, none fails."""
    prompts = [list(range(10 + i, 110 + i)) for i in range(4)]
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    expected = [reference.submit(p, params).result() for p in prompts]
    config = EngineConfig(max_seqs=4, max_batch_tokens=32, max_context=512, kv_memory=16 * block_bytes(tiny_model))
    with LLM(tiny_model, config) as m:
        assert m.engine.max_context == 256  # what the whole pool holds
        got = m.generate(prompts, params)
        with pytest.raises(ContextLengthError, match="256"):
            m.submit(list(range(3, 200)), SamplingParams(max_tokens=100))
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert all(c.finish_reason == "length" for c in got)


def test_shared_prefix_computed_once_outputs_unchanged(tiny_model, reference):
    """After one request, others that start with its 100-token prefix take its 6 full blocks from the cache (and
    report 96 cached tokens); their outputs equal those computed without the cache."""
    system = list(range(200, 300))
    prompts = [system + [5 + i] * (i + 1) for i in range(5)]
    expected = want(reference, prompts, (GREEDY, SEEDED))
    with LLM(tiny_model, EngineConfig(max_seqs=3, max_batch_tokens=8, max_context=256)) as m:
        warm = m.submit(system + [1], GREEDY).result()
        assert warm.cached_tokens == 0
        got = [h.result() for h in [m.submit(p, sp) for p in prompts for sp in (GREEDY, SEEDED)]]
        assert [c.cached_tokens for c in got] == [96] * len(got)
        assert m.kv_stats()["cached_prompt_tokens"] == 96 * len(got)
        # the next turn of a conversation: its prompt is the last prompt, the reply, and a new message
        turn1 = got[0]
        turn2 = prompts[0] + turn1.token_ids + [7, 8, 9]
        again = m.submit(turn2, GREEDY).result()
        assert again.cached_tokens == (len(prompts[0]) + len(turn1.token_ids) - 1) // 16 * 16
        assert again.token_ids == reference.submit(turn2, GREEDY).result().token_ids
    same(got, expected)


def test_whole_prompt_cached_still_computes_its_last_token(tiny_model, reference):
    """A prompt of exactly 2 blocks seen before: the second block's last token is recomputed (into a block of its
    own) so that its logits are there; the cached blocks are never written."""
    p = list(range(40, 72))  # 32 tokens
    with LLM(tiny_model, EngineConfig(max_seqs=2, max_context=256)) as m:
        first = m.submit(p, GREEDY).result()
        second = m.submit(p, GREEDY).result()
        third = m.submit(p, GREEDY).result()
    assert second.cached_tokens == 16 and first.token_ids == second.token_ids == third.token_ids
    assert first.token_ids == reference.submit(p, GREEDY).result().token_ids


def test_cancel_running_and_preempted_sequences(tiny_model, reference):
    """With a pool too small for everyone, cancel one request while it runs and one while it waits: the others'
    outputs are unchanged and every block comes back."""
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompts = [list(range(10 + 7 * i, 60 + 7 * i)) for i in range(5)]
    expected = [reference.submit(p, params).result().token_ids for p in prompts]
    config = EngineConfig(max_seqs=4, max_batch_tokens=16, max_context=256, kv_memory=12 * block_bytes(tiny_model))
    with LLM(tiny_model, config) as m:
        handles = [m.submit(p, params) for p in prompts]
        it = iter(handles[0])
        next(it)
        handles[0].cancel()
        handles[4].cancel()  # most likely still waiting (or preempted)
        rest = list(it)
        results = {i: handles[i].result() for i in (1, 2, 3)}
        assert rest[-1].finish_reason == "cancelled"
        assert list(handles[4])[-1].finish_reason in ("cancelled", "length")
        assert m.kv_stats()["blocks_used"] == 0 and m.stats() == {"waiting": 0, "running": 0}
    assert {i: r.token_ids for i, r in results.items()} == {i: expected[i] for i in (1, 2, 3)}


def test_steps_in_flight_with_preemption_and_prefix_cache(tiny_model, reference):
    """A runner that keeps two steps in flight (as a pipeline does): sequences in flight are never preempted, and
    the outputs are unchanged."""
    from cairn.engine.runner import LocalRunner
    from cairn.models.checkpoint import load_stage
    from tests.test_engine import DeferredRunner

    prompts = PROMPTS + [PROMPTS[5] + [9, 9]]  # shares 7 blocks with PROMPTS[5]
    expected = want(reference, prompts, (GREEDY, SEEDED))
    inner = LocalRunner([load_stage(tiny_model, ModelConfig.from_hf_dir(tiny_model))], 4, 256, num_blocks=20)
    runner = DeferredRunner(inner, depth=2)
    runner.num_blocks, runner.block_size = inner.num_blocks, inner.block_size
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_batch_tokens=8, max_context=256), runner=runner) as m:
        got = [h.result() for h in [m.submit(p, sp) for p in prompts for sp in (GREEDY, SEEDED)]]
        assert m.kv_stats()["preemptions"] > 0
    same(got, expected)


def greedy_by_hand(stage, prompt, n):
    from cairn.models.llama import full_forward

    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            out.append(int(full_forward(stage, torch.tensor([seq]))[0, -1].argmax()))
        seq.append(out[-1])
    return out


def test_sliding_window_gives_back_blocks_and_matches_the_model(model_factory):
    """Mistral with a window of 8: a sequence holds only the blocks its window needs, and greedy output equals
    the whole model's (no cache), with a small pool (preemption), chunked prefill and the prefix cache."""
    from cairn.engine.engine import Engine
    from cairn.engine.runner import LocalRunner
    from cairn.models.checkpoint import load_stage
    from cairn.models.tokenizer import Tokenizer

    path = model_factory("mistral-window")
    cfg = ModelConfig.from_hf_dir(path)
    stage = load_stage(path, cfg)
    prompts = [list(range(3, 3 + n)) for n in (5, 37, 70, 16)]
    expected = [greedy_by_hand(stage, p, 40) for p in prompts]
    with LLM(path, EngineConfig(max_seqs=4, max_batch_tokens=8, max_context=256,
                                kv_memory=8 * block_bytes(path))) as m:
        for _ in range(2):  # the second time from the prefix cache
            assert [c.token_ids for c in m.generate(prompts, GREEDY)] == expected
    # one long sequence: at most the blocks of its window (+ the one being filled) at any step
    engine = Engine(LocalRunner([load_stage(path, cfg)], 1, 512), Tokenizer.from_dir(path), (), max_batch_tokens=8,
                    window=cfg.sliding_window)
    out = []
    engine.add(list(range(3, 40)), SamplingParams(max_tokens=300, temperature=0, ignore_eos=True), out.append)
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.blocks.stats().used)
    assert len(out) == 300 and peak <= 3


def test_kv_memory_grows_with_use(tiny_model):
    """The default pool is every slot a whole context, but only the blocks used are backed (and counted)."""
    per_block = block_bytes(tiny_model)
    with LLM(tiny_model, EngineConfig(max_seqs=8, max_context=512)) as m:
        assert m.kv_stats()["blocks_total"] == 8 * 512 // 16 and m.kv_stats()["bytes_touched"] == 0
        m.generate([list(range(3, 40))] * 2, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        stats = m.kv_stats()
        assert stats["block_bytes"] == per_block
        assert stats["bytes_touched"] == 8 * per_block  # 2 x 57 tokens: 4 blocks each, not 2 contexts


def test_served_usage_reports_cached_prompt_tokens_and_metrics_show_blocks(tiny_model):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from cairn.serve.app import create_app

    with LLM(tiny_model, EngineConfig(max_seqs=2, max_context=512)) as m, TestClient(create_app({"t": m})) as c:
        system = "You answer in exactly one sentence, and you cite the passage you were given. " * 3
        body = {"model": "t", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        first = c.post("/v1/chat/completions", json=body).json()
        second = c.post("/v1/chat/completions", json=body).json()
        prompt = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // 16 * 16 > 0
        assert first["choices"][0]["message"] == second["choices"][0]["message"]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(c.get("/metrics").text) for s in fam.samples}
    blocks = {state: samples[("cairn_kv_blocks", (("model", "t"), ("state", state)))]
              for state in ("used", "cached", "free")}
    assert sum(blocks.values()) == 2 * 512 // 16 and blocks["used"] == 0 and blocks["cached"] > 0
    assert samples[("cairn_prompt_tokens_cached", (("model", "t"),))] == (prompt - 1) // 16 * 16
    assert samples[("cairn_kv_block_size_tokens", (("model", "t"),))] == 16


def test_concurrent_submitters_with_a_tiny_pool(tiny_model, reference):
    """Many threads submitting at once into a pool that holds two contexts: every request finishes unchanged."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [list(range(5 + 3 * i, 45 + 5 * i)) for i in range(8)]
    expected = {i: reference.submit(p, params).result().token_ids for i, p in enumerate(prompts)}
    got = {}
    config = EngineConfig(max_seqs=6, max_batch_tokens=16, max_context=256, kv_memory=32 * block_bytes(tiny_model))
    with LLM(tiny_model, config) as m:
        def run(i):
            got[i] = m.submit(prompts[i], params).result().token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == expected


def test_cli_kv_flags(tiny_model, capsys):
    from cairn.cli import main

    assert main(["generate", str(tiny_model), "--prompt", "x", "--kv-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--kv-memory" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(tiny_model), "--prompt", "x", "--kv-memory", "100"]) == 2
    assert "holds no KV block" in capsys.readouterr().err
    args = ["generate", str(tiny_model), "--prompt", "the river", "--max-tokens", "6", "--ignore-eos", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--kv-memory", "64KiB", "--no-prefix-cache", "--draft", "ngram"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == plain["tokens"]

"""PipelineRunner on a local multi-node Ray cluster: same outputs as one process, compressed wire, failover."""

import os
import pickle
import signal

import pytest
import torch

from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.engine.runner import Chunk
from cairn.engine.sampling import GREEDY as GREEDY_ROW
from cairn.engine.sampling import RowSampling
from cairn.pool.partition import PlacementError

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=11, ignore_eos=True,
                        repetition_penalty=1.1, frequency_penalty=0.2, logprobs=2)
PROMPTS = ["The engineer builds", "A cairn is a heap of stones", "12 plus 7 is"]


def pipeline(path, **kw):
    from cairn.pool.ray_backend import PipelineRunner

    cfg = ModelConfig.from_hf_dir(path)
    args = dict(max_seqs=4, max_context=256, dtype="float32") | kw
    return PipelineRunner(path, cfg, **args)


@pytest.fixture(scope="module")
def pool_model(model_factory):
    return model_factory("llama", shape="small")


@pytest.fixture(scope="module")
def local(pool_model):
    with LLM(pool_model, EngineConfig(max_seqs=4, max_context=256)) as m:
        yield m


def test_placement_uses_pool_devices_within_budgets(ray_cluster, pool_model):
    from cairn.pool.service import pool_devices

    devices = {d.spec.id: d.spec for d in pool_devices()}
    assert sorted(d.memory for d in devices.values()) == [200 * 10**6, 400 * 10**6, 400 * 10**6]
    r = pipeline(pool_model, weights="ship")
    try:
        stages = r.placement.stages
        assert stages[0].layers.start == 0 and stages[-1].layers.end == 4
        assert all(s.memory <= devices[s.device].memory for s in stages)
    finally:
        r.close()


def test_pipeline_greedy_equals_single_process(ray_cluster, pool_model, local):
    runner = pipeline(pool_model, weights="ship")
    with LLM(pool_model, EngineConfig(max_seqs=4, max_context=256), runner=runner) as llm:
        got = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
    want = [c.token_ids for c in local.generate(PROMPTS, GREEDY)]
    assert got == want


def test_pipeline_speculative_greedy_equals_single_process(ray_cluster, pool_model, local):
    """--draft ngram over the pool: the last stage verifies the drafts and sends back only the accepted tokens."""
    prompts = [list(range(3, 40)) * 3, [5, 6, 7] * 20, list(range(100, 160))]
    want = [c.token_ids for c in local.generate(prompts, GREEDY)]
    runner = pipeline(pool_model, weights="ship", depth=2)
    with LLM(pool_model, EngineConfig(max_seqs=4, max_context=256, draft="ngram"), runner=runner) as llm:
        got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        assert llm.kv_stats()["draft_proposed"] > 0  # verified on the last stage (accepted or not)
    assert got == want


def test_pipeline_seeded_sampling_equals_single_process(ray_cluster, pool_model, local):
    """Temperature, filters, penalties and logprobs, chosen on the last stage: the same tokens as in one process."""
    runner = pipeline(pool_model, weights="ship")
    with LLM(pool_model, EngineConfig(max_seqs=4, max_context=256), runner=runner) as llm:
        got = llm.generate(PROMPTS, SEEDED)
    want = local.generate(PROMPTS, SEEDED)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert len({tuple(c.token_ids) for c in want}) == 3  # the prompts did not all collapse to one output
    for g, w in zip(got, want):
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in g.logprobs] == [[t for t, _ in lp.top] for lp in w.logprobs]


def test_last_stage_sends_back_token_ids_not_logits(ray_cluster, pool_model, local):
    r = pipeline(pool_model, weights="ship")
    try:
        ids = torch.randint(3, 2000, (24,), generator=torch.Generator().manual_seed(1)).tolist()
        chunks = [Chunk(0, 0, (ids[0],)), Chunk(1, 0, (ids[1],)), Chunk(2, 0, tuple(ids[2:]))]
        rows = [GREEDY_ROW, None, RowSampling(temperature=1.0, seed=3, position=22)]
        before = r.reply_bytes()
        got = r.collect(r.submit(chunks, rows))
        sent = r.reply_bytes() - before
        want = local.runner.collect(local.runner.submit(chunks, rows))
        assert got == want and got[1] is None
        assert sent == len(pickle.dumps(([got[0].token_id, -1, got[2].token_id], {})))
        vocab = ModelConfig.from_hf_dir(pool_model).vocab_size
        assert sent < 100 < 4 * vocab  # a few bytes per row; one row of logits would be 4 x vocab
    finally:
        r.close()


@pytest.mark.parametrize("wire, tol", [("fp32", 1e-5), ("bf16", 0.1), ("int8", 0.1), ("int4", 1.5)])
def test_wire_dtypes_logits_and_bytes(ray_cluster, pool_model, local, wire, tol):
    """Each wire format moves the logits by at most `tol`, on a decode step and through scoring (the cache-free
    forward evaluation uses), and sends exactly its bytes per token per hop."""
    r = pipeline(pool_model, wire=wire, weights="auto")
    try:
        assert len(r.actors) >= 2, r.placement.describe()  # the 200 MB node cannot hold it alone: it crosses
        ids = torch.randint(3, 2000, (24,), generator=torch.Generator().manual_seed(0)).tolist()
        chunks = [Chunk(2, 0, tuple(ids))]
        got = r.forward(chunks)
        want = local.runner.forward(chunks)
        assert (got - want).abs().max().item() < tol
        sent = r.wire_bytes()
        h = ModelConfig.from_hf_dir(pool_model).hidden_size
        # values, one bf16 scale per 32, one outlier (int16 column + fp32 value) per 128 (int8) or 64 (int4) columns
        per_token = {"fp32": 4 * h, "bf16": 2 * h, "int8": h + 2 * (h // 32) + 6 * (h // 128),
                     "int4": h // 2 + 2 * (h // 32) + 6 * (h // 64)}[wire]
        assert sent == per_token * len(ids) * (len(r.actors) - 1)
        got_lp, _ = r.score(ids)
        want_lp, _ = local.runner.score(ids)
        assert got_lp == pytest.approx(want_lp, abs=tol)
        assert r.wire_bytes() - sent == per_token * len(ids) * (len(r.actors) - 1)
    finally:
        r.close()


def test_killed_stage_mid_generation_recovers_with_identical_output(ray_cluster, pool_model, local):
    """SIGKILL the last stage's process while three requests decode (two greedy, one seeded sampling, with steps in
    flight): all finish, token for token unchanged."""
    import ray

    runner = pipeline(pool_model, weights="ship", depth=2)
    greedy = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(max_tokens=150, temperature=1.0, seed=5, ignore_eos=True)]
    want = [local.submit(p, sp).result().token_ids for p, sp in zip(PROMPTS, params)]
    with LLM(pool_model, EngineConfig(max_seqs=4, max_context=256), runner=runner) as llm:
        handles = [llm.submit(p, sp) for p, sp in zip(PROMPTS, params)]
        events = iter(handles[0])
        head = [next(events) for _ in range(10)]
        os.kill(ray.get(runner.actors[-1].pid.remote()), signal.SIGKILL)
        tail = list(events)
        got = [[e.token_id for e in head + tail], handles[1].result().token_ids, handles[2].result().token_ids]
    assert all(e.error is None for e in tail) and tail[-1].finish_reason == "length"
    assert runner.stats.recoveries, "the kill was not noticed"
    assert got == want


@pytest.mark.parametrize("variant", ["llama", "mistral-window"])
def test_failover_rebuilds_shared_prefix_blocks_under_preemption(ray_cluster, model_factory, variant):
    """Requests that start on prefix blocks another request wrote, a KV pool too small for all of them at once (so
    some are preempted and resumed), and a sliding-window model whose blocks behind the window are given back:
    SIGKILL the last stage mid-generation; every output is unchanged."""
    import ray

    path = model_factory(variant, shape="small")
    system = list(range(300, 400))
    prompts = [system + [5 + i] * (i + 1) for i in range(3)]
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    with LLM(path, EngineConfig(max_seqs=4, max_context=256, prefix_caching=False)) as alone:
        want = [alone.submit(p, params).result().token_ids for p in prompts]
    cfg = ModelConfig.from_hf_dir(path)
    block = 2 * cfg.kv_size * 16 * 4 * cfg.num_layers
    runner = pipeline(path, weights="ship", depth=2, kv_memory=24 * block)
    assert runner.num_blocks == 24
    with LLM(path, EngineConfig(max_seqs=4, max_context=256), runner=runner) as llm:
        llm.submit(system + [1], SamplingParams(max_tokens=4, temperature=0)).result()  # caches the prefix
        handles = [llm.submit(p, params) for p in prompts]
        events = iter(handles[0])
        head = [next(events) for _ in range(10)]
        os.kill(ray.get(runner.actors[-1].pid.remote()), signal.SIGKILL)
        tail = list(events)
        results = [handles[1].result(), handles[2].result()]
        stats = llm.kv_stats()
    got = [[e.token_id for e in head + tail]] + [r.token_ids for r in results]
    assert runner.stats.recoveries and runner.resets >= 1
    assert head[0].cached_tokens == 96
    assert stats["preemptions"] > 0 or variant == "mistral-window"  # its sequences hold only their window's blocks
    assert got == want


def test_steps_in_flight_only_when_stages_are_on_different_machines():
    from cairn.pool.partition import DeviceSpec
    from cairn.pool.ray_backend import _auto_depth
    from cairn.pool.service import PoolDevice

    def dev(address):
        return PoolDevice("n", address, DeviceSpec(id="d", memory=10**9, bandwidth=1e10, flops=1e11), False)

    assert _auto_depth([dev("127.0.0.1")] * 3) == 1  # one machine's cores: micro-batches cannot overlap
    assert _auto_depth([dev("10.0.0.1"), dev("10.0.0.2"), dev("10.0.0.2")]) == 3
    assert _auto_depth([dev("10.0.0.1")]) == 1


def test_pool_too_small_fails_before_loading_with_numbers(ray_cluster, pool_model):
    with pytest.raises(PlacementError, match=r"needs at least .* GiB .* offer .* GiB"):
        pipeline(pool_model, max_seqs=64, max_context=4096, kv_memory=2 * 2**30)


def test_placement_budgets_kv_blocks_not_the_worst_case(ray_cluster, pool_model):
    """64 sequences x 4096 positions would need 1 GiB of KV for this model, more than the pool's 1 GB: placement
    asks for one whole context and the pool takes what the tightest stage has left, at most the worst case."""
    from cairn.pool.service import pool_devices

    cfg = ModelConfig.from_hf_dir(pool_model)
    worst = 64 * 4096 * 2 * cfg.kv_size * cfg.num_layers * 4
    assert worst > sum(d.spec.memory for d in pool_devices())
    r = pipeline(pool_model, max_seqs=64, max_context=4096)
    try:
        per_block = 2 * cfg.kv_size * 16 * 4  # one layer
        assert 4096 // 16 <= r.num_blocks < 64 * 4096 // 16
        memory = {d.spec.id: d.spec.memory for d in pool_devices()}
        for st in r.placement.stages:  # the blocks fit every stage beside its weights
            assert st.memory - len(st.layers) * r.shape.kv_bytes_per_layer + \
                len(st.layers) * r.num_blocks * per_block <= memory[st.device]
    finally:
        r.close()


def test_scoring_through_the_pipeline_equals_one_process(ray_cluster, pool_model, local):
    r = pipeline(pool_model, weights="ship")
    try:
        assert len(r.actors) >= 2
        ids = torch.randint(3, 2000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        got, got_greedy = r.score(ids)
        want, want_greedy = local.runner.score(ids)
        assert len(got) == len(ids) - 1 and got == pytest.approx(want, abs=1e-4) and got_greedy == want_greedy
    finally:
        r.close()

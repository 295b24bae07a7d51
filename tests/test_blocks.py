"""The KV block allocator (pure): allocation, sharing, prefix cache, eviction, sliding windows, preemption; the KV
budgets of one process and of a pool placement."""

import pytest

from cairn.engine.blocks import NO_BLOCK, BlockAllocator, BlockStats, blocks_for, chain_digest, preemption_victims

BS = 4


def toks(n, start=100):
    return list(range(start, start + n))


@pytest.mark.parametrize("n, want", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_for(n, want):
    assert blocks_for(n, BS) == want


def test_admit_grow_release_lowest_ids_first():
    a = BlockAllocator(6, BS)
    assert a.admit("x", [], 5)  # 2 blocks
    assert a.admit("y", [], 4)  # 1 block
    assert a.table("x") == [0, 1] and a.table("y") == [2]
    assert a.grow("x", 8) and a.table("x") == [0, 1]  # still 2 blocks
    assert a.grow("x", 9) and a.table("x") == [0, 1, 3]
    assert a.stats() == BlockStats(total=6, used=4, cached=0, free=2)
    a.release("x")  # nothing digested (no commit): plain free blocks
    assert a.stats() == BlockStats(total=6, used=1, cached=0, free=5)
    assert a.admit("z", [], 12) and a.table("z") == [0, 1, 3]  # the lowest free ids again


@pytest.mark.parametrize("free_first, n_tokens, reserve, ok", [
    (0, 24, 0, True),    # 6 blocks of 6
    (0, 25, 0, False),   # 7 blocks
    (0, 20, 1, True),    # 5 + 1 headroom
    (0, 21, 1, False),   # 6 + 1 headroom
    (2, 16, 0, True),    # 2 taken: 4 left
    (2, 17, 0, False),
])
def test_admission_needs_every_block_or_changes_nothing(free_first, n_tokens, reserve, ok):
    a = BlockAllocator(6, BS)
    if free_first:
        a.admit("other", [], free_first * BS)
    before = a.stats()
    assert a.admit("x", [], n_tokens, reserve=reserve) is ok
    if not ok:
        assert a.stats() == before and a.table("x") == []


def test_grow_that_does_not_fit_changes_nothing():
    a = BlockAllocator(3, BS)
    a.admit("x", [], 8)
    a.admit("y", [], 4)
    assert not a.grow("x", 9)
    assert a.table("x") == [0, 1] and a.stats().free == 0


def test_prefix_cache_shares_full_computed_blocks():
    a = BlockAllocator(8, BS)
    prompt = toks(10)  # 2 full blocks + 2 tokens
    a.admit("x", a.match(prompt, 9 // BS), 10)
    assert a.match(prompt, 2) == []  # nothing computed yet
    a.commit("x", prompt, 6)
    assert a.match(prompt, 2) == [0]  # only full, computed blocks
    a.commit("x", prompt, 10)
    assert a.match(prompt, 2) == [0, 1] and a.match(prompt, 1) == [0]
    assert a.match(toks(10, start=0), 2) == []  # different tokens
    assert a.match(prompt[:4] + [7] + prompt[5:], 2) == [0]  # diverges in block 1
    # a second sequence shares them while the first still runs
    a.admit("y", a.match(prompt, 2), 12)
    assert a.table("y")[:2] == [0, 1] and a.table("y")[2] not in a.table("x")
    assert a.stats().used == 3 + 1
    a.release("x")
    assert a.stats() == BlockStats(total=8, used=3, cached=0, free=5)  # x's private tail went back
    a.release("y")
    assert a.stats() == BlockStats(total=8, used=0, cached=2, free=6)  # the prefix stays cached


def test_cached_blocks_are_evicted_least_recently_used_tail_first():
    a = BlockAllocator(4, BS)
    p, q = toks(8), toks(8, start=500)
    for seq, tokens in (("p", p), ("q", q)):
        a.admit(seq, [], 8)
        a.commit(seq, tokens, 8)
        a.release(seq)
    assert a.stats().cached == 4 and a.available == 4
    # p's blocks were released first, its tail before its head: the eviction order is p1, p0, q1, q0
    a.admit("n", [], 4)
    assert a.match(p, 2) == [0] and a.match(q, 2) == [2, 3]
    a.admit("m", [], 4)
    assert a.match(p, 2) == [] and a.match(q, 2) == [2, 3]
    # taking a cached block back out of the LRU protects it; admission counts that it is no longer available
    a.release("n")
    a.release("m")
    assert not a.admit("big", a.match(q, 2), 20)
    assert a.admit("k", a.match(q, 2), 16) and a.table("k")[:2] == [2, 3]


def test_same_prefix_computed_twice_stays_private():
    a = BlockAllocator(8, BS)
    p = toks(8)
    for seq in ("x", "y"):
        a.admit(seq, [], 8)
    for seq in ("x", "y"):
        a.commit(seq, p, 8)
    assert a.match(p, 2) == a.table("x")
    a.release("y")
    assert a.stats().cached == 0 and a.stats().free == 6  # y's copies were never registered


def test_digest_chain_depends_on_everything_before():
    one, two = chain_digest(b"", [1, 2]), chain_digest(b"", [1, 3])
    assert one != two and chain_digest(one, [5, 6]) != chain_digest(two, [5, 6])
    assert chain_digest(one, [5, 6]) == chain_digest(chain_digest(b"", [1, 2]), [5, 6])


def test_caching_off_never_matches():
    a = BlockAllocator(8, BS, caching=False)
    a.admit("x", [], 8)
    a.commit("x", toks(8), 8)
    assert a.match(toks(8), 2) == []
    a.release("x")
    assert a.stats().cached == 0


def test_sliding_window_gives_back_blocks_behind_it():
    a = BlockAllocator(8, BS)
    a.admit("x", [], 14)  # 4 blocks
    assert a.drop_before("x", 3) == 0  # block 0 still holds position 3
    assert a.drop_before("x", 8) == 2 and a.table("x") == [NO_BLOCK, NO_BLOCK, 2, 3]
    assert a.drop_before("x", 8) == 0
    assert a.stats().used == 2 and a.reclaimable("x") == 2
    a.release("x")
    assert a.stats().free == 8


def test_forget_cache_after_the_runner_lost_its_blocks():
    a = BlockAllocator(4, BS)
    a.admit("x", [], 8)
    a.commit("x", toks(8), 8)
    a.admit("y", a.match(toks(8), 1), 8)  # holds block 0
    a.release("x")
    assert a.stats().cached == 1  # block 1
    assert a.forget_cache() == 1
    assert a.match(toks(8), 2) == [0]  # held by y: rebuilt by the runner's replay, still valid
    assert a.stats() == BlockStats(total=4, used=2, cached=0, free=2)


def test_reclaimable_counts_only_unshared_blocks():
    a = BlockAllocator(8, BS)
    a.admit("x", [], 8)
    a.commit("x", toks(8), 8)
    a.admit("y", a.match(toks(8), 2), 12)
    assert a.reclaimable("x") == 0 and a.reclaimable("y") == 1


@pytest.mark.parametrize("need, available, running, requester, want", [
    (1, 1, [("a", 2, True), ("b", 2, True)], "a", []),                      # enough already
    (1, 0, [("a", 2, True), ("b", 2, True)], "a", ["b"]),                   # newest goes
    (3, 0, [("a", 2, True), ("b", 2, True), ("c", 2, True)], "a", ["c", "b"]),
    (1, 0, [("a", 2, True), ("b", 2, False), ("c", 1, True)], "a", ["c"]),  # b is busy (in flight)
    (2, 0, [("a", 2, True), ("b", 2, False), ("c", 1, True)], "a", ["c", "a"]),  # not enough: a waits too
    (1, 0, [("a", 2, True), ("b", 2, True)], "b", ["b"]),                   # never an older one: b waits
    (1, 0, [("a", 2, True), ("b", 0, True), ("c", 3, True)], "b", ["c"]),
    (2, 0, [("a", 5, True), ("b", 1, True), ("c", 0, True)], "b", ["c", "b"]),
])
def test_preemption_victims(need, available, running, requester, want):
    assert preemption_victims(need, available, running, requester) == want


def test_local_kv_budget():
    from cairn.config import EngineConfig
    from cairn.engine.api import kv_blocks
    from cairn.errors import UserError
    from cairn.models.init import shape_config

    cfg = shape_config("smollm-135m")  # 30 layers x 3 kv heads x 64: 45 KiB per position in fp32
    per_block = 45 * 1024 * 16
    assert kv_blocks(cfg, EngineConfig(kv_memory=64 * 2**20), "float32", 8192, None) == 64 * 2**20 // per_block
    assert kv_blocks(cfg, EngineConfig(kv_memory=64 * 2**20), "bfloat16", 8192, None) == 2 * 64 * 2**20 // per_block
    worst = 16 * 8192 // 16
    assert kv_blocks(cfg, EngineConfig(max_seqs=16), "float32", 8192, None) == worst  # free memory unknown
    assert kv_blocks(cfg, EngineConfig(max_seqs=16), "float32", 8192, 10**12) == worst  # capped at the worst case
    assert kv_blocks(cfg, EngineConfig(max_seqs=16), "float32", 8192, 100 * per_block) == 8192 // 16  # >= 1 context
    assert kv_blocks(cfg, EngineConfig(max_seqs=16), "float32", 8192, 2000 * per_block) == 2000
    with pytest.raises(UserError, match="holds no KV block") as e:
        kv_blocks(cfg, EngineConfig(kv_memory=1000), "float32", 8192, None)
    assert e.value.param == "kv_memory"


def test_pool_kv_blocks_take_what_the_tightest_stage_has_left():
    from cairn.pool.partition import DeviceSpec, ModelShape, kv_blocks, partition
    from cairn.models.init import shape_config

    cfg = shape_config("smollm-135m")
    worst = ModelShape.from_config(cfg, 4, 8192, 16)
    one_context = ModelShape.from_config(cfg, 4, 8192, 16, kv_tokens=8192)
    assert worst.kv_bytes_per_layer == 16 * one_context.kv_bytes_per_layer
    devices = [DeviceSpec(f"d{i}", 320 * 2**20, 10e9, 50e9) for i in range(4)]
    with pytest.raises(Exception, match="cannot hold"):
        partition(worst, devices)  # what 16 x 8192 positions reserved would need
    placement = partition(one_context, devices)
    block_layer = 2 * cfg.kv_size * 16 * 4
    memory = {d.id: d.memory for d in devices}
    n = kv_blocks(one_context, placement, memory, block_layer, cap=16 * 8192 // 16)
    assert n >= 8192 // 16
    for st in placement.stages:  # that many blocks fit beside each stage's weights, one more would not somewhere
        weights = st.memory - len(st.layers) * one_context.kv_bytes_per_layer
        assert weights + len(st.layers) * n * block_layer <= memory[st.device]
    assert any(st.memory - len(st.layers) * one_context.kv_bytes_per_layer + len(st.layers) * (n + 1) * block_layer
               > memory[st.device] for st in placement.stages)
    assert kv_blocks(one_context, placement, memory, block_layer, cap=600) == 600

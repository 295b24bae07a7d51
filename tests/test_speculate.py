"""Speculative decoding by prompt lookup: the proposer, the acceptance rule and k's adaptation (pure), and greedy
output through the engine equal to plain greedy decoding."""

import pytest

from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.engine.speculate import DraftState, NgramIndex, accept_greedy, adapt


@pytest.mark.parametrize("tokens, k, want", [
    ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),          # "1 2" occurred at 0: what followed it
    ([1, 2, 3, 4, 1, 2], 1, [3]),
    ([1, 2, 3, 1, 2, 3, 1, 2], 2, [3, 1]),       # the latest occurrence (at 3) wins
    ([5, 1, 2, 9, 7, 2], 2, [9, 7]),             # no longer match: 1-gram "2"
    ([1, 2, 3], 4, []),                          # nothing occurred before
    ([7, 7, 7, 7], 3, [7]),                      # what followed the latest earlier "7 7 7" (only one token so far)
    ([4, 5, 6, 4, 5], 0, []),
    ([], 3, []),
])
def test_ngram_proposals(tokens, k, want):
    idx = NgramIndex(max_n=3)
    idx.extend(tokens)
    assert idx.propose(k) == want


def test_ngram_index_extends_incrementally():
    whole, parts = NgramIndex(), NgramIndex()
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9]
    whole.extend(seq)
    for t in seq:
        parts.extend([t])
    assert whole._last == parts._last and whole.propose(5) == parts.propose(5)


@pytest.mark.parametrize("draft, greedy, want", [
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),  # all accepted, plus the model's own next token
    ([5, 6, 7], [5, 9, 7, 8], [5, 9]),        # stops at the first disagreement, with the model's token
    ([5, 6, 7], [4, 6, 7, 8], [4]),           # nothing accepted: one token, as a plain step
    ([], [3], [3]),
])
def test_accept_greedy(draft, greedy, want):
    assert accept_greedy(draft, greedy) == want


@pytest.mark.parametrize("state, proposed, accepted, want", [
    (DraftState(4, 1.0, 0), 4, 4, DraftState(6, 1.0, 0)),    # all accepted: more
    (DraftState(6, 1.0, 0), 6, 6, DraftState(8, 1.0, 0)),    # capped at k_max
    (DraftState(4, 1.0, 0), 4, 1, DraftState(2, 0.775, 0)),  # under half: fewer
    (DraftState(4, 1.0, 0), 4, 3, DraftState(4, 0.925, 0)),
    (DraftState(2, 0.3, 0), 2, 0, DraftState(1, 0.5, 8)),    # average under 1/4: pause
    (DraftState(1, 0.5, 8), 0, 0, DraftState(1, 0.5, 7)),    # a plain step counts the pause down
    (DraftState(3, 0.9, 0), 0, 0, DraftState(3, 0.9, 0)),
])
def test_adapt(state, proposed, accepted, want):
    got = adapt(state, proposed, accepted, k_max=8)
    assert (got.k, got.pause) == (want.k, want.pause) and got.rate == pytest.approx(want.rate)


COPY = [list(range(3, 40)) * 3, list(range(50, 90)) + list(range(50, 70)), [5, 6, 7] * 20, list(range(100, 160))]


@pytest.fixture(scope="module")
def plain(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=256, max_batch_tokens=16)) as m:
        yield m


@pytest.mark.parametrize("kv_blocks", [None, 20])
def test_speculative_greedy_equals_plain_greedy(tiny_model, plain, kv_blocks):
    """Copy-heavy prompts (and one with nothing to copy), alone and batched, with a pool small enough to preempt;
    stop tokens and max_tokens cut a step's accepted drafts where plain decoding would have stopped."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (60, 7)]
    want = [[plain.submit(p, sp).result().token_ids for p in COPY] for sp in params]
    stop_at = want[0][0][20]
    stopped = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=(stop_at,))
    want_stop = plain.submit(COPY[0], stopped).result()
    kv = None if kv_blocks is None else kv_blocks * 2 * 2 * 32 * 16 * 4
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=256, max_batch_tokens=16, draft="ngram",
                                      kv_memory=kv)) as m:
        alone = [[m.submit(p, sp).result().token_ids for p in COPY] for sp in params]
        together = [[c.token_ids for c in m.generate(COPY, sp)] for sp in params]
        got_stop = m.submit(COPY[0], stopped).result()
        stats = m.kv_stats()
    assert alone == want and together == want
    assert got_stop.token_ids == want_stop.token_ids and got_stop.finish_reason == "stop"
    assert stats["draft_accepted"] > 0.5 * stats["draft_proposed"] > 0
    if kv_blocks:
        assert stats["preemptions"] > 0


def test_sampled_and_penalised_requests_keep_their_tokens(tiny_model, plain):
    """Seeded sampling with filters and penalties is drafted too: each position is chosen as a plain step would
    choose it (same draw), so the tokens are the same; requests with logprobs are not drafted."""
    params = [SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.5, presence_penalty=0.4, frequency_penalty=0.3, seed=2,
                             ignore_eos=True)]
    want = [[plain.submit(p, sp).result().token_ids for p in COPY] for sp in params]
    logprobs = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    want_lp = plain.submit(COPY[0], logprobs).result()
    with LLM(tiny_model, EngineConfig(max_seqs=4, max_context=256, draft="ngram")) as m:
        got = [[c.token_ids for c in m.generate(COPY, sp)] for sp in params]
        proposed = m.kv_stats()["draft_proposed"]
        got_lp = m.submit(COPY[0], logprobs).result()
        assert m.kv_stats()["draft_proposed"] == proposed > 0
    assert got == want
    assert got_lp.token_ids == want_lp.token_ids
    assert [lp.logprob for lp in got_lp.logprobs] == pytest.approx([lp.logprob for lp in want_lp.logprobs], abs=1e-4)


@pytest.mark.parametrize("row", [
    dict(temperature=0.9, top_k=20, seed=1), dict(temperature=1.0, top_p=0.8, min_p=0.05, seed=2),
    dict(temperature=0.0, repetition_penalty=1.5, seen=(1, 2, 3)), dict(temperature=0.8, presence_penalty=0.5,
                                                                        frequency_penalty=0.5, generated=(4, 4), seed=3),
    dict(temperature=0.0, logit_bias=((5, 3.0),)), dict(temperature=0.0),
])
def test_verify_chooses_each_position_as_a_plain_step_would(row):
    """Against choose_row position by position (the oracle: plain decoding), for drafts that agree with it
    entirely, partly, or not at all."""
    import torch

    from cairn.engine.sampling import RowSampling, choose_row, verify

    g = torch.Generator().manual_seed(0)
    base = RowSampling(position=10, **row)
    logits = torch.randn(5, 64, generator=g) * 3  # (k + 1, V)
    plain = []
    for i in range(5):
        before = tuple(plain)
        at = RowSampling(**{**row, "position": 10 + i, "seen": base.seen + before if base.seen else (),
                            "generated": base.generated + before if base.generated else ()})
        plain.append(choose_row(logits[i], at).token_id)
    for draft in (plain[:4], plain[:2] + [(plain[2] + 1) % 64, plain[3]], [(plain[0] + 1) % 64] + plain[1:4]):
        c = verify(logits, RowSampling(position=10, draft=tuple(draft), **row))
        emitted = [c.token_id, *c.then]
        n = next((i for i, (d, p) in enumerate(zip(draft, plain)) if d != p), len(draft))
        assert emitted == plain[: n + 1]


def test_sampled_acceptance_rate_is_the_target_probability():
    """A one-token proposal d is accepted with probability p(d) (the standard rule for a draft that proposes d
    with certainty), and the token emitted is distributed as the target's: checked over 4000 seeds."""
    import torch

    from cairn.engine.sampling import RowSampling, verify

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0] * 5])  # (2, V): after the last token, after the draft
    p = logits[0].softmax(-1)
    n, accepted, counts = 4000, 0, torch.zeros(5)
    for seed in range(n):
        c = verify(logits, RowSampling(temperature=1.0, seed=seed, position=3, draft=(1,)))
        accepted += c.token_id == 1 and len(c.then) == 1
        counts[c.token_id] += 1
    sd = (p[1] * (1 - p[1]) / n) ** 0.5
    assert abs(accepted / n - p[1]) < 4 * sd
    assert torch.allclose(counts / n, p, atol=4 * (0.25 / n) ** 0.5)

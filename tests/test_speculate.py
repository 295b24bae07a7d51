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
    (DraftState(2, 0.3, 0), 2, 0, DraftState(1, 0.5, 8, 16)),  # average under 1/4: pause
    (DraftState(1, 0.5, 8), 0, 0, DraftState(1, 0.5, 7)),    # a plain step counts the pause down
    (DraftState(3, 0.9, 0), 0, 0, DraftState(3, 0.9, 0)),
    (DraftState(1, 0.3, 0, 16), 1, 0, DraftState(1, 0.5, 16, 32)),  # paused again at once: twice as long
    (DraftState(1, 0.3, 0, 256), 1, 0, DraftState(1, 0.5, 256, 256)),
    (DraftState(2, 0.9, 0, 32), 2, 2, DraftState(3, 0.93, 0, 8)),  # paying again: pauses start short
])
def test_adapt(state, proposed, accepted, want):
    got = adapt(state, proposed, accepted, k_max=8)
    assert (got.k, got.pause, got.backoff) == (want.k, want.pause, want.backoff)
    assert got.rate == pytest.approx(want.rate)


def test_adapt_pauses_a_costly_draft_below_its_break_even():
    """A draft model costing 0.8 of a step pays only above 80% acceptance: at half it pauses; on resuming, one
    accepted proposal keeps it going and one rejected pauses it again (twice as long)."""
    s = adapt(DraftState(4, 0.85, 0), 4, 2, k_max=8, break_even=0.8)
    assert (s.k, s.pause) == (1, 8)
    assert adapt(s, 1, 1, k_max=8, break_even=0.8).pause == 0
    assert adapt(s, 1, 0, k_max=8, break_even=0.8).pause == 16


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


# ----- a draft model (--draft MODEL_DIR)


@pytest.fixture(scope="module")
def early_exit(tiny_model, tmp_path_factory):
    """A draft model that shares the model's tokenizer: its first layer, norm and head as a checkpoint of its own."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("draft") / "m"
    shutil.copytree(tiny_model, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    return path


@pytest.mark.parametrize("draft", ["itself", "early exit"])
def test_draft_model_output_equals_plain_decoding(tiny_model, plain, early_exit, draft):
    """Greedy, seeded sampling and batched requests give the model's own tokens; the model drafting for itself has
    its proposals accepted (all but near-ties between its batched and step-by-step arithmetic)."""
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, top_k=20, seed=3, ignore_eos=True)]
    prompts = COPY + [[9, 8, 7, 6, 5]]
    want = [[plain.submit(p, sp).result().token_ids for p in prompts] for sp in params]
    path = tiny_model if draft == "itself" else early_exit
    with LLM(tiny_model, EngineConfig(max_seqs=2, max_context=256, draft=str(path))) as m:
        alone = [[m.submit(p, sp).result().token_ids for p in prompts] for sp in params[:1]]
        greedy = m.kv_stats()  # greedy proposals of the draft, checked by greedy choices
        alone += [[m.submit(p, sp).result().token_ids for p in prompts] for sp in params[1:]]
        together = [[c.token_ids for c in m.generate(prompts, sp)] for sp in params]  # more than its 2 draft slots
    assert alone == want and together == want
    assert greedy["draft_proposed"] > 0
    if draft == "itself":
        assert greedy["draft_accepted"] > 0.9 * greedy["draft_proposed"]


def test_draft_model_with_another_tokenizer_is_refused(tiny_model, tmp_path, capsys):
    from cairn.cli import main
    from cairn.models.init import init_model

    other = tmp_path / "other"
    init_model(other, shape="tiny", seed=0, corpus=["completely different words for another vocabulary"] * 50)
    code = main(["generate", str(tiny_model), "--prompt", "hi", "--max-tokens", "4", "--draft", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer differs" in err and len(err.strip().splitlines()) == 1

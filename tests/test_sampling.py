"""Sampling filters are pure functions: checked against hand-computed expectations."""

import math

import pytest
import torch

from cairn.config import SamplingParams
from cairn.engine.sampling import (
    GREEDY,
    RowSampling,
    apply_logit_bias,
    apply_penalties,
    choose,
    draw,
    min_p_filter,
    top_k_filter,
    top_logprobs,
    top_p_filter,
    uniform,
)
from cairn.errors import UserError

NEG = float("-inf")


def test_top_k_keeps_k_largest():
    out = top_k_filter(torch.tensor([1.0, 5.0, 3.0, 4.0]), 2)
    assert out.tolist() == [NEG, 5.0, NEG, 4.0]
    assert top_k_filter(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = top_p_filter(logits, 0.8).isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [True, True, True, False]
    assert top_p_filter(logits, 0.1).isfinite().tolist() == [True, False, False, False]  # always one token


def test_min_p_relative_to_top():
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    assert min_p_filter(probs.log(), 0.1).isfinite().tolist() == [True, True, True, False]


def test_penalties_match_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rep = apply_penalties(logits, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long), repetition=2.0)
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0]
    pen = apply_penalties(logits, torch.tensor([3]), torch.tensor([3, 3, 2]), presence=0.5, frequency=0.25)
    assert pen.tolist() == pytest.approx([2.0, -1.0, 0.5 - 0.25 - 0.5, 3.0 - 0.5 - 0.5])
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # input untouched


def test_draw_is_a_function_of_seed_and_position_and_follows_distribution():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.25, 0.75
    assert uniform(7, 12) == uniform(7, 12) and 0 <= uniform(7, 12) < 1
    assert len({uniform(7, p) for p in range(100)}) == 100 and uniform(7, 0) != uniform(8, 0)
    draws = [draw(logits, uniform(3, p)) for p in range(4000)]
    assert abs(sum(draws) / 4000 - 0.75) < 0.03
    by_seed = [draw(logits, uniform(s, 5)) for s in range(4000)]
    assert abs(sum(by_seed) / 4000 - 0.75) < 0.03


def test_draw_inverts_the_cdf_and_never_picks_a_filtered_token():
    logits = torch.tensor([0.0, NEG, 0.0, 0.0, NEG])  # p = 1/3 each for tokens 0, 2, 3
    assert [draw(logits, u) for u in (0.0, 0.3, 0.34, 0.66, 0.67, 0.999999)] == [0, 0, 2, 2, 3, 3]
    assert draw(logits, 1.0 - 2.0**-53) == 3


def test_choose_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    sampled = RowSampling(temperature=1.0, seed=4, position=9)
    out = choose(logits, [GREEDY, None, sampled])
    assert out[0].token_id == 1 and out[0].logprob is None and out[1] is None
    assert out[2].token_id == draw(logits[2], uniform(4, 9))
    with_lp = choose(logits[:1], [RowSampling(logprobs=2)])[0]
    lp = torch.log_softmax(logits[0], -1)
    assert with_lp.token_id == 1 and with_lp.logprob == pytest.approx(float(lp[1]))
    assert [t for t, _ in with_lp.top] == [1, 2]
    penalised = choose(logits[:1], [RowSampling(repetition_penalty=10.0, seen=(1,))])[0]
    assert penalised.token_id == 2  # 3 / 10 < 2
    with pytest.raises(ValueError, match="2 sampling rows for 3 rows"):
        choose(logits, [GREEDY, GREEDY])


def test_logit_bias_is_added_before_everything_and_steers_greedy_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert apply_logit_bias(logits[0], ((0, 2.5), (2, -100.0))).tolist() == [3.5, 3.0, -98.0]
    row = logits[0]
    assert apply_logit_bias(row, ()) is row
    biased = RowSampling(logit_bias=((0, 2.5),))
    assert not biased.plain_greedy and choose(logits, [biased])[0].token_id == 0  # greedy: 1 + 2.5 > 3
    sampled = RowSampling(temperature=1.0, seed=1, position=3, logit_bias=((2, 100.0),))
    assert choose(logits, [sampled])[0].token_id == 2  # p(token 2) ~ 1
    with_lp = choose(logits, [RowSampling(logprobs=1, logit_bias=((0, 2.5),))])[0]
    assert with_lp.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[0]))  # the model's logprob
    with pytest.raises(UserError) as e:
        SamplingParams(logit_bias=((3, 101.0),))
    assert e.value.param == "logit_bias"


def test_top_logprobs_sorted():
    lp = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0]), -1)
    top = top_logprobs(lp, 2)
    assert [t for t, _ in top] == [1, 2] and top[0][1] == pytest.approx(float(lp[1]))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(presence_penalty=3), dict(stop=("",)), dict(logprobs=50)])
def test_bad_params_name_the_field(bad):
    with pytest.raises(UserError) as e:
        SamplingParams(**bad)
    assert e.value.param == next(iter(bad))


def test_top_p_keeps_what_a_full_sort_keeps():
    """The partial-sort nucleus (top k, widened until its mass reaches p) against the plain definition: sort the
    whole vocabulary, keep tokens whose mass strictly above them is below p. Peaked and flat distributions (the
    flat ones need k widened past its first guess)."""
    from cairn.engine.sampling import NEG_INF, top_p_filter

    g = torch.Generator().manual_seed(0)
    for scale in (8.0, 1.0, 0.01):
        for p in (0.1, 0.5, 0.9, 0.99):
            logits = torch.randn(5000, generator=g) * scale
            order = torch.argsort(logits, descending=True)
            probs = logits[order].softmax(-1).double()
            keep = set(order[(probs.cumsum(-1) - probs) < p].tolist())
            got = top_p_filter(logits, p)
            assert set((got > NEG_INF).nonzero().flatten().tolist()) == keep, (scale, p)
            assert torch.equal(got[list(keep)], logits[list(keep)])

"""Engine behaviour: continuous batching, chunked prefill, sampling controls, stops, cancellation, limits."""

import threading

import pytest
import torch

from cairn.config import EngineConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.engine.detok import TextStream
from cairn.errors import ContextLengthError, UserError
from cairn.models.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = ["The engineer builds", "A cairn is a heap of stones " * 6, "hi", "12 plus 7 is", "Seven blue stones"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=3, max_batch_tokens=8, max_context=256)) as m:
        yield m


def test_batched_outputs_equal_solo_outputs(llm):
    """More requests than slots, long prompts prefilled in 8-token chunks: each equals its solo run."""
    alone = [llm.submit(p, GREEDY).result().token_ids for p in PROMPTS]
    together = llm.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in together] == alone
    assert all(len(t) == 16 for t in alone)


def test_requests_join_while_others_decode(llm):
    long = llm.submit("The engineer builds", SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    events = iter(long)
    for _ in range(5):
        next(events)
    late = llm.submit("hi", GREEDY).result()  # finishes while `long` is still decoding
    rest = list(events)
    assert late.token_ids == llm.submit("hi", GREEDY).result().token_ids
    assert len(rest) == 55


def test_long_prompt_does_not_stall_decoding(tiny_model):
    """While a 200-token prompt is prefilled in 8-token chunks, a running request keeps getting tokens."""
    order = []
    with LLM(tiny_model, EngineConfig(max_seqs=2, max_batch_tokens=8, max_context=256)) as m:
        short = m.submit("hi", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        first = next(iter(short))
        long_prompt = list(range(3, 203))
        long = m.submit(long_prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        lock = threading.Lock()

        def drain(h, name):
            for _ in h:
                with lock:
                    order.append(name)

        t = threading.Thread(target=drain, args=(long, "long"))
        t.start()
        drain(short, "short")
        t.join()
    assert first.token_id is not None
    # 200 prompt tokens take >= 25 steps; short keeps decoding meanwhile, so it is not all after "long".
    assert order.index("long") > 10


def test_seed_reproducible_and_seeds_differ(llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    a = llm.submit("The engineer", p).result().token_ids
    b = llm.submit("The engineer", p).result().token_ids
    c = llm.submit("The engineer", SamplingParams(max_tokens=20, temperature=1.0, seed=124, ignore_eos=True)).result()
    assert a == b
    assert c.token_ids != a


def test_top_k_one_is_greedy(llm):
    g = llm.submit("The engineer", GREEDY).result().token_ids
    k1 = llm.submit("The engineer", SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=5, ignore_eos=True))
    assert k1.result().token_ids == g


def test_stop_token_and_eos(llm):
    g = llm.submit("The engineer", GREEDY).result().token_ids
    stop_at = g[3]
    first = g.index(stop_at)
    r = llm.submit("The engineer", SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(stop_at,))).result()
    assert r.finish_reason == "stop" and r.token_ids == g[: first + 1]


def test_generation_stops_at_an_end_of_sequence_token(llm, tiny_model, tmp_path):
    """A model whose generation_config.json names, as end of sequence, a token greedy decoding is known to emit:
    generation stops right after its first occurrence (finish "stop"); ignore_eos goes on to max_tokens."""
    import json
    import shutil

    g = llm.submit("The engineer", GREEDY).result().token_ids
    eos = next(t for t in g[4:] if t not in g[:4])  # emitted first at a known later position
    model = shutil.copytree(tiny_model, tmp_path / "m")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "do_sample": False}))
    with LLM(model, EngineConfig(max_seqs=1, max_context=256)) as m:
        stops = set(m.engine.eos_ids)  # ours plus config.json's own
        assert eos in stops
        first = next(i for i, t in enumerate(g) if t in stops)
        ended = m.submit("The engineer", SamplingParams(max_tokens=16, temperature=0)).result()
        assert ended.finish_reason == "stop" and ended.token_ids == g[: first + 1]
        assert m.submit("The engineer", GREEDY).result().token_ids == g


def test_stop_string_truncates_text(llm):
    full = llm.submit("The engineer", GREEDY).result()
    assert len(full.text) > 6
    stop = full.text[4:7]
    idx = full.text.find(stop)
    r = llm.submit("The engineer", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,))).result()
    assert r.finish_reason == "stop"
    assert r.text == full.text[:idx]


def test_logprobs_match_log_softmax_of_model(llm, tiny_model):
    transformers = pytest.importorskip("transformers")
    r = llm.submit("The engineer", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)).result()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = llm.encode_prompt("The engineer") + r.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)
    n = len(ids) - len(r.token_ids)
    for i, item in enumerate(r.logprobs):
        assert item.logprob == pytest.approx(float(lp[n - 1 + i, item.token_id]), abs=1e-4)
        assert item.top[0][0] == item.token_id  # greedy: the chosen token is the top one
        assert len(item.top) == 3


def greedy_by_hand(model_dir, prompt: list[int], n: int, repetition=1.0, presence=0.0, frequency=0.0) -> list[int]:
    """The oracle: greedy decoding from the whole model's logits for the sequence so far (no cache, no batching),
    penalties written out. Repetition (CTRL, as in transformers): a token of prompt or output has its logit divided
    by the penalty when positive, multiplied when negative. Presence / frequency (OpenAI): an output token's logit
    drops by presence + frequency x its count in the output."""
    from cairn.config import ModelConfig
    from cairn.models.checkpoint import load_stage
    from cairn.models.llama import full_forward

    stage = load_stage(model_dir, ModelConfig.from_hf_dir(model_dir))
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = full_forward(stage, torch.tensor([seq]))[0, -1].tolist()  # (V,)
        for t in set(seq):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        out.append(max(range(len(logits)), key=logits.__getitem__))
        seq.append(out[-1])
    return out


@pytest.mark.parametrize("penalty", [{"repetition": 5.0}, {"repetition": 1.3}, {"presence": 0.3, "frequency": 0.2},
                                     {"presence": 0.5}, {"frequency": 0.3}])
def test_penalties_follow_their_formulas_through_the_engine(llm, tiny_model, penalty):
    """Greedy with penalties equals decoding by hand, step by step, on a prompt whose plain greedy output repeats
    (so every penalty has something to act on, and does change the output)."""
    n, prompt = 24, llm.encode_prompt("The engineer")
    plain = llm.submit(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).result().token_ids
    assert plain == greedy_by_hand(tiny_model, prompt, n)
    assert len(set(plain)) < len(plain), f"the test needs a prompt whose greedy output repeats, got {plain}"
    names = {"repetition": "repetition_penalty", "presence": "presence_penalty", "frequency": "frequency_penalty"}
    got = llm.submit(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                            **{names[k]: v for k, v in penalty.items()})).result().token_ids
    assert got == greedy_by_hand(tiny_model, prompt, n, **penalty)
    assert got != plain


def test_logit_bias_through_the_engine_matches_greedy_by_hand(llm, tiny_model):
    """A bias that demotes the plain greedy token steers greedy decoding exactly as adding it by hand would."""
    prompt = llm.encode_prompt("The engineer")
    plain = llm.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).result().token_ids
    bias = ((plain[0], -5.0), (plain[1], 3.0))
    got = llm.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                            logit_bias=bias)).result().token_ids
    from cairn.config import ModelConfig
    from cairn.models.checkpoint import load_stage
    from cairn.models.llama import full_forward

    stage, seq, want = load_stage(tiny_model, ModelConfig.from_hf_dir(tiny_model)), list(prompt), []
    for _ in range(6):
        with torch.no_grad():
            logits = full_forward(stage, torch.tensor([seq]))[0, -1]  # (V,)
        for t, b in bias:
            logits[t] += b
        want.append(int(logits.argmax()))
        seq.append(want[-1])
    assert got == want and got != plain
    with pytest.raises(UserError) as e:
        llm.submit(prompt, SamplingParams(max_tokens=2, logit_bias=((llm.model_config.vocab_size, 1.0),)))
    assert e.value.param == "logit_bias"


def test_prompt_logprobs_match_the_model(llm, tiny_model):
    transformers = pytest.importorskip("transformers")
    ids = llm.encode_prompt("The engineer builds a cairn")
    got = llm.prompt_logprobs(ids, 2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)  # (T, V)
    assert got[0] is None and len(got) == len(ids)
    for i, item in enumerate(got[1:]):
        assert item.token_id == ids[i + 1]
        assert item.logprob == pytest.approx(float(lp[i, ids[i + 1]]), abs=1e-4)
        assert [t for t, _ in item.top] == lp[i].topk(2).indices.tolist()


def test_engine_failures_are_typed_errors_not_status_codes(tiny_model, monkeypatch):
    """A runner failure ends the requests with the exception itself: a CairnError as it is (CapacityError stays a
    CapacityError), anything else as a GenerationError chained to it."""
    from cairn.errors import CapacityError, GenerationError

    with LLM(tiny_model, EngineConfig(max_seqs=2, max_context=256)) as m:
        for raised, expected in [(CapacityError("devices gone"), CapacityError), (KeyError("bug"), GenerationError)]:
            def fail(chunks, rows, raised=raised):
                raise raised

            monkeypatch.setattr(m.runner, "submit", fail)
            h = m.submit("hi", GREEDY)
            events = list(h)
            assert events[-1].finish_reason == "error" and events[-1].error is raised
            with pytest.raises(expected) as e:
                m.submit("hi", GREEDY).result(timeout=30)
            assert e.value is raised or e.value.__cause__ is raised
        monkeypatch.undo()
        assert m.submit("hi", GREEDY).result(timeout=30).finish_reason == "length"  # the engine carries on


def test_cancel_frees_the_slot(tiny_model):
    with LLM(tiny_model, EngineConfig(max_seqs=1, max_context=256)) as m:
        hog = m.submit("The engineer", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        it = iter(hog)
        next(it)
        waiting = m.submit("hi", GREEDY)  # no slot until hog goes
        hog.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled"
        assert len(rest) < 199
        assert waiting.result().finish_reason == "length"
        assert m.stats() == {"waiting": 0, "running": 0}


def test_context_limits_are_clear_errors(llm):
    with pytest.raises(ContextLengthError, match="256"):
        llm.submit(list(range(300)), GREEDY)
    with pytest.raises(ContextLengthError, match="max_tokens"):
        llm.submit("hi", SamplingParams(max_tokens=400))
    with pytest.raises(UserError, match="empty"):
        llm.submit([], GREEDY)
    with pytest.raises(UserError, match="token ids"):
        llm.submit([10**6], GREEDY)
    r = llm.submit(list(range(3, 250)), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)).result()
    assert r.finish_reason == "length" and len(r.token_ids) == 256 - 247


def test_many_threads_submit_concurrently(llm):
    want = {p: llm.submit(p, GREEDY).result().token_ids for p in PROMPTS}
    got = {}

    def run(p):
        got[p] = llm.submit(p, GREEDY).result().token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_streamed_text_equals_decoded_text(tiny_model):
    tok = Tokenizer.from_dir(tiny_model)
    text = "Crème brûlée costs 12 €, naïve café. 日本語"
    ids = tok.encode(text)
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == tok.decode(ids) == text


def test_stop_string_held_back_until_resolved(tiny_model):
    tok = Tokenizer.from_dir(tiny_model)
    ids = tok.encode("one two three four")
    s = TextStream(tok, stop=("three",))
    shown = "".join(s.push(i) for i in ids) + s.finish()
    assert shown == "one two " and s.stopped


def test_reader_loop_gone_does_not_disturb_other_requests(llm):
    """A handle read from an event loop that has since closed must not break the engine for everyone else."""
    import asyncio

    h = llm.submit("The engineer", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))

    async def read_two():
        n = 0
        async for _ in h:
            n += 1
            if n == 2:
                return

    asyncio.run(read_two())  # the loop closes while the request keeps generating
    other = llm.submit("hi", GREEDY).result(timeout=60)
    assert other.finish_reason == "length" and len(other.token_ids) == 16
    h.cancel()


class DeferredRunner:
    """A LocalRunner that keeps steps in flight like a pipeline does: a step runs only when it is collected."""

    def __init__(self, inner, depth: int):
        self.inner, self.depth = inner, depth
        self.max_seqs, self.max_context = inner.max_seqs, inner.max_context
        self.pending: list = []
        self.freed_while_pending: list[int] = []

    def submit(self, chunks, rows):
        busy = {c.slot for step in self.pending for c in step[0]}
        assert not busy & {c.slot for c in chunks}, "two steps in flight share a slot"
        self.pending.append((chunks, rows))
        return len(self.pending) - 1

    def collect(self, handle):
        chunks, rows = self.pending.pop(0)
        return self.inner.collect(self.inner.submit(chunks, rows))

    def forward(self, chunks):
        return self.inner.forward(chunks)

    def free(self, slot):
        if any(c.slot == slot for step in self.pending for c in step[0]):
            self.freed_while_pending.append(slot)

    def close(self):
        self.inner.close()


def test_steps_in_flight_give_the_same_tokens(tiny_model, llm):
    """A runner that keeps two steps in flight (as a pipeline does) gets the same tokens, greedy and seeded, with
    more requests than slots, chunked prompts and a cancel while a step is in flight."""
    from cairn.engine.runner import LocalRunner
    from cairn.models.checkpoint import load_stage

    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=1)
    want = [llm.submit(p, sp).result() for p in PROMPTS for sp in (GREEDY, seeded)]
    cfg = llm.model_config
    inner = LocalRunner([load_stage(tiny_model, cfg, dtype="float32")], 3, 256)
    runner = DeferredRunner(inner, depth=2)
    with LLM(tiny_model, EngineConfig(max_seqs=3, max_batch_tokens=8, max_context=256), runner=runner) as m:
        hog = m.submit("The engineer", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        it = iter(hog)
        next(it)
        handles = [m.submit(p, sp) for p in PROMPTS for sp in (GREEDY, seeded)]
        hog.cancel()
        assert list(it)[-1].finish_reason == "cancelled"
        got = [h.result() for h in handles]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g, w in zip(got, want):  # batches differ, so float sums differ in the last bits
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)
    assert not runner.freed_while_pending

"""cairn.merge.search: the gene <-> recipe map (bounds, gradients, conditionals, the data flow space), CMA-ES
finding a known optimum from merged tensors, resuming without recomputation (an uninterrupted run as the oracle),
best.yaml valid for cairn and mergekit and reproducing the best model, the progress PNG, eval-based scoring against
`cairn eval` itself, and the CLI entry point's refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from cairn.errors import UserError
from cairn.merge import merge, parse_recipe
from cairn.merge.commands import search_recipe
from cairn.merge.search import LOG, eval_score, search, task_score
from cairn.merge.space import search_space
from cairn.models.init import init_model

PROBE = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> directory of a tiny float32 Llama: base/a/b with 2 layers, p/q with 4."""
    root = tmp_path_factory.mktemp("search-zoo")
    specs = {"base": {"seed": 1}, "a": {"seed": 2}, "b": {"seed": 3}, "p": {"seed": 11, "num_layers": 4},
             "q": {"seed": 12, "num_layers": 4}}
    for name, spec in specs.items():
        init_model(root / name, shape="tiny", arch="llama", dtype="float32", init_std=0.1, **spec)
    return {name: str(root / name) for name in specs}


def _tensor(model_dir, name: str) -> torch.Tensor:
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ties(zoo) -> str:
    return f"""
merge_method: ties
base_model: {zoo['base']}
models:
  - model: {zoo['base']}
  - model: {zoo['a']}
    parameters: {{weight: [0, 0.5, 1], density: 0.7}}
  - model: {zoo['b']}
    parameters:
      weight: [{{filter: mlp, value: 0.25}}, {{value: 1.5}}]
      density: 0.5
parameters: {{lambda: 1.0, normalize: true}}
dtype: float32
"""


def _linear(zoo) -> str:
    return f"""merge_method: linear
models:
  - model: {zoo['a']}
    parameters: {{weight: 0.5}}
  - model: {zoo['b']}
    parameters: {{weight: 0.5}}
parameters: {{normalize: false}}
"""


def _stack(zoo) -> str:
    return f"""merge_method: passthrough
slices:
  - sources: [{{model: {zoo['p']}, layer_range: [0, 2]}}]
  - sources: [{{model: {zoo['q']}, layer_range: [2, 4]}}]
"""


# ---------------------------------------------------------------------------------------------------------------
# the gene <-> recipe map


def test_parameter_space_names_bounds_and_start(zoo):
    space = search_space(parse_recipe(_ties(zoo)))
    dims = {d.name: (d.low, d.high) for d in space.dims}
    assert dims == {
        "models[1].parameters.weight[0]": (0.0, 1.0), "models[1].parameters.weight[1]": (0.0, 1.0),
        "models[1].parameters.weight[2]": (0.0, 1.0), "models[1].parameters.density": (0.05, 1.0),
        "models[2].parameters.weight[0].value": (0.0, 1.0),
        "models[2].parameters.weight[1].value": (0.0, 1.5),  # widened to include the recipe's own value
        "models[2].parameters.density": (0.05, 1.0), "parameters.lambda": (0.0, 2.0)}
    assert space.params(space.start) == {
        "models[1].parameters.weight[0]": 0.0, "models[1].parameters.weight[1]": 0.5,
        "models[1].parameters.weight[2]": 1.0, "models[1].parameters.density": 0.7,
        "models[2].parameters.weight[0].value": 0.25, "models[2].parameters.weight[1].value": 1.5,
        "models[2].parameters.density": 0.5, "parameters.lambda": 1.0}
    start = space.recipe(space.start)  # the starting point is the recipe itself
    assert start.models[1].parameters["weight"].entries[0].value == (0.0, 0.5, 1.0)
    assert start.models[2].parameters["weight"].entries[0].filter == "mlp"


def test_genes_round_trip_and_respect_bounds(zoo):
    space = search_space(parse_recipe(_ties(zoo)), bounds={"lambda": (0.5, 3.0)})
    n = len(space.dims)
    rng = np.random.default_rng(0)
    for _ in range(20):
        genes = rng.uniform(0, 1, n)
        params = space.params(genes)
        np.testing.assert_allclose(space.genes(params), genes, atol=2e-6)
        for d in space.dims:
            assert d.low <= params[d.name] <= d.high
        recipe = space.recipe(genes)  # valid for cairn's parser, values where the genes say
        assert recipe.models[1].parameters["weight"].entries[0].value == tuple(
            params[f"models[1].parameters.weight[{i}]"] for i in range(3))
        assert recipe.parameters["lambda"].entries[0].value == params["parameters.lambda"]
    low, high = space.params(np.zeros(n)), space.params(np.full(n, 1.0))
    assert low["parameters.lambda"] == 0.5 and high["parameters.lambda"] == 3.0
    assert low["models[1].parameters.density"] == 0.05 and high["models[2].parameters.weight[1].value"] == 1.5
    assert space.params(np.full(n, 7.0)) == high and space.params(np.full(n, -3.0)) == low  # clipped


def test_bounds_checked_and_nothing_to_search_refused(zoo):
    with pytest.raises(UserError, match="unknown parameter 'wieght'"):
        search_space(parse_recipe(_ties(zoo)), bounds={"wieght": (0, 1)})
    with pytest.raises(UserError, match="low < high"):
        search_space(parse_recipe(_ties(zoo)), bounds={"weight": (1, 0)})
    wide = search_space(parse_recipe(_linear(zoo)), bounds={"weight": (-1, 2)})
    assert [(d.low, d.high) for d in wide.dims] == [(-1.0, 2.0), (-1.0, 2.0)]
    one_model = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {zoo['p']}, layer_range: [0, 4]}}]\n"
    with pytest.raises(UserError, match="no number to search"):
        search_space(parse_recipe(one_model))
    stock = (f"merge_method: model_stock\nbase_model: {zoo['base']}\n"
             f"models: [{{model: {zoo['base']}}}, {{model: {zoo['a']}}}, {{model: {zoo['b']}}}]\n")
    with pytest.raises(UserError, match="no number to search"):
        search_space(parse_recipe(stock))
    with pytest.raises(UserError, match="skip_layers"):
        search_space(parse_recipe(_linear(zoo)), skip_layers=True)


def test_dataflow_space(zoo):
    p, q = zoo["p"], zoo["q"]
    space = search_space(parse_recipe(_stack(zoo)))
    assert [d.name for d in space.dims] == [f"slots[{k}].model" for k in range(4)]
    assert all(d.choices == (p, q) for d in space.dims)
    assert space.params(space.start) == {"slots[0].model": p, "slots[1].model": p, "slots[2].model": q,
                                         "slots[3].model": q}
    assert space.document(space.start)["slices"] == yaml.safe_load(_stack(zoo))["slices"]
    assert space.document([0.9, 0.1, 0.1, 0.6])["slices"] == [
        {"sources": [{"model": q, "layer_range": [0, 1]}]}, {"sources": [{"model": p, "layer_range": [1, 2]}]},
        {"sources": [{"model": p, "layer_range": [2, 3]}]}, {"sources": [{"model": q, "layer_range": [3, 4]}]}]
    for genes in np.random.default_rng(1).uniform(0, 1, (10, 4)):  # categorical genes: params round-trip
        assert space.params(space.genes(space.params(genes))) == space.params(genes)
    skip = search_space(parse_recipe(_stack(zoo)), skip_layers=True)
    assert len(skip.dims) == 8
    keep = {d.name: g for d, g in zip(skip.dims, skip.start)}
    keep.update({"slots[1].keep": 0.1, "slots[2].keep": 0.2})
    assert skip.document([keep[d.name] for d in skip.dims])["slices"] == [
        {"sources": [{"model": p, "layer_range": [0, 1]}]}, {"sources": [{"model": q, "layer_range": [3, 4]}]}]
    none_kept = [g if d.kind == "source" else 0.1 + 0.01 * d.slot for d, g in zip(skip.dims, skip.start)]
    assert skip.document(none_kept)["slices"] == [{"sources": [{"model": q, "layer_range": [3, 4]}]}]
    short = f"""merge_method: passthrough
slices:
  - sources: [{{model: {zoo['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {p}, layer_range: [2, 4]}}]
"""
    # layers 2 and 3 exist in p only: just the first two slots have a choice
    assert [d.name for d in search_space(parse_recipe(short)).dims] == ["slots[0].model", "slots[1].model"]


# ---------------------------------------------------------------------------------------------------------------
# the search


def _target_score(zoo):
    """Score by the distance of a merged tensor to 0.3 a + 0.7 b: the optimum of a linear merge (normalize off)
    is weights (0.3, 0.7)."""
    target = 0.3 * _tensor(zoo["a"], PROBE) + 0.7 * _tensor(zoo["b"], PROBE)
    calls = []

    def evaluate(model_dir):
        calls.append(model_dir)
        return -float(((_tensor(model_dir, PROBE) - target) ** 2).mean() / target.pow(2).mean())

    return evaluate, calls


@pytest.fixture(scope="module")
def linear_search(zoo, tmp_path_factory):
    evaluate, calls = _target_score(zoo)
    out = tmp_path_factory.mktemp("linear-search")
    result = search(parse_recipe(_linear(zoo)), evaluate, budget=60, out_dir=out, population=6, seed=0)
    return result, evaluate, calls


def test_search_finds_the_optimum(linear_search):
    result, _, calls = linear_search
    assert len(calls) == result.evaluations == 60 and result.resumed == 0 and result.generations == 10
    w = result.best_params
    assert abs(w["models[0].parameters.weight"] - 0.3) < 0.04 and abs(w["models[1].parameters.weight"] - 0.7) < 0.04
    lines = (result.out_dir / LOG).read_text().splitlines()
    records = [json.loads(x)["candidate"] for x in lines[1:]]
    assert len(records) == 60 and max(r["score"] for r in records) == result.best_score
    assert not (result.out_dir / "scratch").exists()


def test_best_yaml_valid_and_reproduces_best_model(linear_search, tmp_path):
    from mergekit.config import MergeConfiguration

    result, evaluate, _ = linear_search
    text = result.best_yaml.read_text()
    recipe = parse_recipe(text)
    MergeConfiguration.model_validate(yaml.safe_load(text))
    assert recipe.models[0].parameters["weight"].entries[0].value == result.best_params["models[0].parameters.weight"]
    merge(recipe, tmp_path / "again")
    best, again = _tensors(result.best_dir), _tensors(tmp_path / "again")
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)
    assert evaluate(result.best_dir) == result.best_score  # best/ is the best candidate's model


def test_gradient_and_conditional_recipe_written_valid(zoo, tmp_path):
    from mergekit.config import MergeConfiguration

    result = search(parse_recipe(_ties(zoo)), lambda d: -float(_tensor(d, PROBE).abs().mean()), budget=5,
                    out_dir=tmp_path, population=4, seed=1)
    text = result.best_yaml.read_text()
    MergeConfiguration.model_validate(yaml.safe_load(text))
    recipe = parse_recipe(text)
    weight = recipe.models[2].parameters["weight"].entries
    assert [(e.filter, e.value) for e in weight] == [
        ("mlp", result.best_params["models[2].parameters.weight[0].value"]),
        (None, result.best_params["models[2].parameters.weight[1].value"])]
    merge(recipe, tmp_path / "again")
    best, again = _tensors(result.best_dir), _tensors(tmp_path / "again")
    assert all(torch.equal(best[k], again[k]) for k in best)
    assert result.generations == 1 and result.evaluations == 5


def test_progress_png_written(linear_search):
    png = linear_search[0].plot
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_resume_replays_without_recomputing(zoo, tmp_path):
    evaluate, _ = _target_score(zoo)
    recipe = parse_recipe(_linear(zoo))
    oracle = search(recipe, evaluate, budget=14, out_dir=tmp_path / "oracle", population=4, seed=3)

    calls = []

    def interrupted(model_dir):
        calls.append(model_dir)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return evaluate(model_dir)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        search(recipe, interrupted, budget=14, out_dir=out, population=4, seed=3)
    assert len((out / LOG).read_text().splitlines()) == 1 + 5
    assert (out / "best.yaml").is_file() and (out / "search.png").is_file()  # written when interrupted too
    with open(out / LOG, "a") as f:
        f.write('{"candidate": {"index": 5, "gen')  # a line cut short by the interruption
    calls.clear()
    counted = []
    result = search(recipe, lambda d: counted.append(d) or evaluate(d), budget=14, out_dir=out, population=4, seed=3)
    assert len(counted) == 9 and result.evaluations == 14 and result.resumed == 5
    assert result.best_score == oracle.best_score and result.best_params == oracle.best_params
    mine = [json.loads(x)["candidate"] for x in (out / LOG).read_text().splitlines()[1:]]
    theirs = [json.loads(x)["candidate"] for x in (oracle.out_dir / LOG).read_text().splitlines()[1:]]
    assert [(c["genes"], c["score"]) for c in mine] == [(c["genes"], c["score"]) for c in theirs]
    again = []
    search(recipe, lambda d: again.append(d) or evaluate(d), budget=14, out_dir=out, population=4, seed=3)
    assert again == []  # nothing left to do
    with pytest.raises(UserError, match="population 4 now 6"):
        search(recipe, evaluate, budget=14, out_dir=out, population=6, seed=3)


def test_dataflow_search_finds_the_layer_pattern(zoo, tmp_path):
    from mergekit.config import MergeConfiguration

    p, q = zoo["p"], zoo["q"]
    name = "model.layers.{}.self_attn.q_proj.weight"
    want = [p, q, q, p]
    layers = {m: [_tensor(m, name.format(k)) for k in range(4)] for m in (p, q)}

    def evaluate(model_dir):
        return float(sum(torch.equal(_tensor(model_dir, name.format(k)), layers[m][k]) for k, m in enumerate(want)))

    result = search(parse_recipe(_stack(zoo)), evaluate, budget=30, out_dir=tmp_path, population=6, seed=0)
    assert result.best_score == 4.0
    assert [result.best_params[f"slots[{k}].model"] for k in range(4)] == want
    MergeConfiguration.model_validate(yaml.safe_load(result.best_yaml.read_text()))
    assert evaluate(result.best_dir) == 4.0


def test_failed_merges_are_failed_candidates(zoo, tmp_path):
    # normalized linear weights stuck at 0: every candidate's merge fails, is recorded, and the search says so
    text = _linear(zoo).replace("normalize: false", "normalize: true").replace("weight: 0.5", "weight: 0.0")
    with pytest.raises(UserError, match="none of the 4 candidates could be merged and scored .*sum to 0"):
        search(parse_recipe(text), lambda d: 1.0, budget=4, out_dir=tmp_path, population=4, seed=0,
               bounds={"weight": (0.0, 1e-9)})
    records = [json.loads(x)["candidate"] for x in (tmp_path / LOG).read_text().splitlines()[1:]]
    assert len(records) == 4 and all(r["score"] is None and "sum to 0" in r["error"] for r in records)


# ---------------------------------------------------------------------------------------------------------------
# scoring by cairn eval, and the CLI face


def test_task_score_formula():
    tasks = [{"task": "choice", "acc": 0.5}, {"task": "generate", "exact_match": 0.25, "contains": 0.75},
             {"task": "perplexity", "perplexity": math.e ** 2}]
    assert task_score(tasks) == pytest.approx((0.5 + 0.25 - 2.0) / 3)
    assert task_score(tasks, generate_metric="contains") == pytest.approx((0.5 + 0.75 - 2.0) / 3)
    assert task_score(tasks, {"choice": 2.0, "perplexity": 0.0}) == pytest.approx((2 * 0.5 + 0.25) / 3)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-tasks")
    items = [{"question": "The capital of France is", "choices": ["Paris", "Berlin"], "answer": 0},
             {"question": "Two plus two equals", "choices": ["three", "four"], "answer": 1}]
    (root / "choice.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (root / "text.txt").write_text("A heap of stones marks the path over the hills. " * 4)
    return root / "choice.jsonl", root / "text.txt"


def test_eval_score_matches_cairn_eval(zoo, task_files):
    from cairn.config import EngineConfig
    from cairn.engine.api import LLM
    from cairn.eval.commands import evaluate

    choice, text = task_files
    with LLM(zoo["a"], EngineConfig(max_seqs=16, threads=1)) as llm:
        tasks = evaluate(llm, [str(text)], [str(choice)])["tasks"]
    want = (tasks[1]["acc"] - math.log(tasks[0]["perplexity"])) / 2
    got = eval_score([choice], perplexity_files=[text], threads=1, device="cpu")(zoo["a"])
    assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(UserError, match="at least one evaluation task"):
        eval_score()
    with pytest.raises(UserError, match="not found"):
        eval_score([str(choice) + ".missing"])


def test_search_recipe_command(zoo, task_files, tmp_path, capsys):
    choice, _ = task_files
    path = tmp_path / "recipe.yaml"
    path.write_text(_linear(zoo))
    with pytest.raises(UserError, match="--budget must be at least 1"):
        search_recipe(str(path), str(tmp_path / "out"), 0, choice=[str(choice)])
    with pytest.raises(UserError, match="at least one evaluation task"):
        search_recipe(str(path), str(tmp_path / "out"), 2)
    with pytest.raises(UserError, match="NAME=LOW:HIGH"):
        search_recipe(str(path), str(tmp_path / "out"), 2, choice=[str(choice)], bounds=["weight=0-1"])
    stock = tmp_path / "stock.yaml"
    stock.write_text(f"merge_method: model_stock\nbase_model: {zoo['base']}\n"
                     f"models: [{{model: {zoo['base']}}}, {{model: {zoo['a']}}}, {{model: {zoo['b']}}}]\n")
    with pytest.raises(UserError, match="no number to search"):
        search_recipe(str(stock), str(tmp_path / "out"), 2, choice=[str(choice)])
    assert search_recipe(str(path), str(tmp_path / "out"), 2, choice=[str(choice)], population=4, threads=1,
                         bounds=["weight=0.1:1"], progress=False) == 0
    printed = capsys.readouterr().out
    assert "searched 2 candidates" in printed and (tmp_path / "out" / "best" / "config.json").is_file()


def test_pool_worker_protocol():
    from cairn.pool.tasks import _portable, _Worker

    assert _Worker().run(lambda x: x * 2, 21) == (True, 42)
    def refuse(x):
        raise UserError("bad input", param="p")

    ok, err = _Worker().run(refuse, 0)
    assert not ok and isinstance(err, UserError) and str(err) == "bad input" and err.param == "p"

    class Unpicklable(Exception):
        def __init__(self, a, b):
            super().__init__(a)

    assert isinstance(_portable(Unpicklable("x", "y")), RuntimeError)

"""cairn.merge: formulas against hand computation, recipe parsing (mergekit's documented examples), parameter
resolution, refusals, a memory bound, resumable sharded output, and mergekit itself as the oracle on tiny models."""

from __future__ import annotations

import json
import math
import shutil
import weakref

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cairn.errors import UserError
from cairn.merge import merge, methods, parse_recipe
from cairn.merge.inputs import Reader
from cairn.merge.plan import plan_merge
from cairn.merge.recipe import Conditional, Setting, interpolate
from cairn.models.corpus import shipped_corpus
from cairn.models.init import init_model

# ---------------------------------------------------------------------------------------------------------------
# models


SPECS = {
    "base": {"seed": 1},
    "a": {"seed": 2},
    "b": {"seed": 3},
    "untied": {"seed": 6, "tie_word_embeddings": False},
    "deep": {"seed": 11, "num_layers": 5},
    "deep2": {"seed": 12, "num_layers": 5},
    "wide": {"seed": 7, "intermediate_size": 128},
    "bias": {"seed": 8, "mlp_bias": True, "bias_std": 0.1},
}
FINETUNES = {"ft1": 21, "ft2": 22, "ft3": 23}


def _finetune(src, dst, seed: int, scale: float = 0.02) -> None:
    """A "fine-tune" of src: every float tensor plus noise with a component shared by all fine-tunes, so deltas
    correlate (model_stock's angle, TIES' sign election and slerp's near-colinear branch all get exercised)."""
    dst.mkdir(parents=True)
    gen, shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        common = torch.randn(t.shape, generator=shared)
        out[name] = t + scale * (0.7 * common + torch.randn(t.shape, generator=gen))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> directory of a tiny float32 Llama (made on first use)."""
    root = tmp_path_factory.mktemp("merge-zoo")
    made = {}

    def get(name: str):
        if name not in made:
            path = root / name
            if name in FINETUNES:
                _finetune(get("base"), path, FINETUNES[name])
            elif name == "other_tok":  # another tokenizer: trained on a third of the corpus
                corpus = shipped_corpus()
                init_model(path, shape="tiny", arch="llama", seed=4, dtype="float32", init_std=0.1,
                           corpus=corpus[: len(corpus) // 3])
            else:
                init_model(path, shape="tiny", arch="llama", dtype="float32", init_std=0.1, **SPECS[name])
            made[name] = path
        return made[name]

    return get


def _recipe(template: str, zoo) -> str:
    """The YAML with {name} placeholders replaced by the zoo's model directories."""
    for name in [*SPECS, *FINETUNES, "other_tok"]:
        if "{" + name + "}" in template:
            template = template.replace("{" + name + "}", str(zoo(name)))
    return template


def _tensors(out_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------------------------
# formulas against hand computation


def test_linear_formula():
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([4.0, 0.0, 1.0])
    torch.testing.assert_close(methods.linear([a, b], [0.3, 0.5]), (0.3 * a + 0.5 * b) / 0.8)
    torch.testing.assert_close(methods.linear([a, b], [0.3, 0.5], normalize=False), 0.3 * a + 0.5 * b)
    with pytest.raises(UserError, match="sum to 0"):
        methods.linear([a, b], [1.0, -1.0])


def test_slerp_formula():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])  # 90 degrees apart, unequal norms
    s = math.sin(math.pi / 4)  # sin((1 - t) * theta) / sin(theta) at t = 0.5
    torch.testing.assert_close(methods.slerp(0.5, v0, v1), torch.tensor([2 * s, 4 * s]))
    t = 1 / 3  # coefficients sin(60°) and sin(30°) of the unnormalized inputs
    torch.testing.assert_close(methods.slerp(t, v0, v1), torch.tensor([2 * math.sin(math.pi / 3), 4 * 0.5]))
    torch.testing.assert_close(methods.slerp(0.0, v0, v1), v0)
    torch.testing.assert_close(methods.slerp(1.0, v0, v1), v1)
    near = torch.tensor([1.0, 0.01])  # cos > 0.9995: linear interpolation
    torch.testing.assert_close(methods.slerp(0.25, torch.tensor([1.0, 0.0]), near),
                               0.75 * torch.tensor([1.0, 0.0]) + 0.25 * near)
    m0, m1 = torch.randn(3, 4), torch.randn(3, 4)  # a matrix is one flattened vector
    torch.testing.assert_close(methods.slerp(0.3, m0, m1), methods.slerp(0.3, m0.reshape(-1), m1.reshape(-1))
                               .reshape(3, 4))


def test_task_arithmetic_formula():
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, -1.0])
    d1, d2 = m1 - base, m2 - base
    torch.testing.assert_close(methods.task_arithmetic(base, [m1, m2], [0.5, 2.0]), base + 0.5 * d1 + 2.0 * d2)
    torch.testing.assert_close(methods.task_arithmetic(base, [m1, m2], [0.5, 2.0], normalize=True, lambda_=1.5),
                               base + 1.5 * (0.5 * d1 + 2.0 * d2) / 2.5)


def test_magnitude_prune_and_l1_rescale():
    d = torch.tensor([1.0, -5.0, 3.0, -0.5])
    torch.testing.assert_close(methods.magnitude_prune(d, 0.5), torch.tensor([0.0, -5.0, 3.0, 0.0]))
    torch.testing.assert_close(methods.magnitude_prune(d, 0.5, rescale=True),
                               torch.tensor([0.0, -5.0, 3.0, 0.0]) * (9.5 / 8.0))
    torch.testing.assert_close(methods.magnitude_prune(d, 0.1), torch.tensor([0.0, -5.0, 0.0, 0.0]))  # keeps >= 1
    torch.testing.assert_close(methods.magnitude_prune(d, 1.0), d)
    torch.testing.assert_close(methods.magnitude_prune(d, 0.0), torch.zeros(4))


def test_ties_formula():
    """Deltas [1, -2, 3] and [-3, 1, 1]: sums [-2, -1, 4] elect signs [-, -, +]; the agreeing deltas are summed and
    divided by the agreeing weights."""
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-3.0, 1.0, 1.0])
    torch.testing.assert_close(methods.ties(base, [m1, m2], [1.0, 1.0], [1.0, 1.0]), torch.tensor([-3.0, -2.0, 2.0]))
    torch.testing.assert_close(methods.ties(base, [m1, m2], [1.0, 1.0], [1.0, 1.0], normalize=False),
                               torch.tensor([-3.0, -2.0, 4.0]))
    # density 2/3 trims each to its top 2 magnitudes: [0, -2, 3] and [-3, 1, 0]; weighted (1, 2): [0, -2, 3] and
    # [-6, 2, 0]; sums [-6, 0, 3] elect [-, +, +] (a zero sum elects +); agreeing: -6 (w 2), 2 (w 2), 3 (w 1)
    torch.testing.assert_close(methods.ties(base, [m1, m2], [1.0, 2.0], [2 / 3, 2 / 3]),
                               torch.tensor([-6.0 / 2, 2.0 / 2, 3.0 / 1]))


def test_random_prune_statistics():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(200_000, generator=gen)
    kept = methods.random_prune(d, 0.3, rescale=False, generator=torch.Generator().manual_seed(1))
    mask = kept != 0
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(kept[mask], d[mask])  # kept elements untouched, dropped ones zero
    scaled = methods.random_prune(d, 0.3, rescale=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled.abs().sum(), d.abs().sum())  # L1 norm restored (mergekit 0.1.5)
    ratio = scaled[mask] / d[mask]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and abs(ratio[0].item() - 1 / 0.3) < 0.05
    again = methods.random_prune(d, 0.3, rescale=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, scaled)  # the generator decides
    dare = methods.dare_linear(torch.zeros_like(d), [d], [1.0], [0.3], torch.Generator().manual_seed(1))
    torch.testing.assert_close(dare, scaled)


def test_breadcrumbs_formula():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # density 0.5 keeps 5, gamma 0.2 drops the 2 largest, so the 3 smallest go too: magnitudes 4..8 remain
    want = torch.tensor([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0])
    torch.testing.assert_close(methods.outlier_prune(d, 0.5, 0.2), want)
    # density 0.9 keeps 9: no room for the 2 outliers and the small ones, so the cut shrinks to the 1 largest
    torch.testing.assert_close(methods.outlier_prune(d, 0.9, 0.2), torch.tensor(
        [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, 0.0]))
    base = torch.ones(10)
    torch.testing.assert_close(methods.breadcrumbs(base, [base + d], [0.5], [0.5], [0.2]), base + 0.5 * want)


def test_model_stock_formula():
    base = torch.zeros(2)
    m1, m2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(methods.model_stock(base, [m1, m2]), t * torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(methods.model_stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]),
                               base)  # orthogonal deltas: t = 0
    rows = torch.stack([m1, m2])  # filter_wise: one angle per row
    other = torch.stack([m2, m2])
    got = methods.model_stock(torch.zeros(2, 2), [rows, other], filter_wise=True)
    torch.testing.assert_close(got[0], t * (m1 + m2) / 2)
    torch.testing.assert_close(got[1], m2)  # identical deltas: cos 1, t = 1


def test_passthrough_formula():
    x = torch.tensor([1.0, -2.0])
    assert methods.passthrough(x) is x
    torch.testing.assert_close(methods.passthrough(x, 0.5), x * 0.5)


# ---------------------------------------------------------------------------------------------------------------
# recipes: mergekit's documented examples, parameter resolution, refusals

DOC_EXAMPLES = {
    "linear": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "ties": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "passthrough": """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "bio-merge": """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: bfloat16
""",
    "model_stock": """
models:
  - model: fine-tune-a
  - model: fine-tune-b
merge_method: model_stock
base_model: the-base
parameters:
  filter_wise: false
dtype: bfloat16
""",
    "breadcrumbs": """
models:
  - model: fine-tune-a
    parameters: {weight: 1.0, density: 0.9, gamma: 0.01}
  - model: fine-tune-b
    parameters: {weight: 0.5, density: 0.8}
merge_method: breadcrumbs
base_model: the-base
parameters:
  lambda: 1.2
tokenizer_source: base
""",
}


def test_parse_documented_examples():
    r = parse_recipe(DOC_EXAMPLES["linear"])
    assert r.merge_method == "linear" and r.dtype == "float16" and [m.model for m in r.models] == [
        "psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2", "garage-bAInd/Platypus2-13B"]
    assert r.models[1].parameters["weight"].resolve("any", 0.0) == 0.3

    r = parse_recipe(DOC_EXAMPLES["gradient-slerp"])
    assert r.base_model == "psmathur/orca_mini_v3_13b" and len(r.slices) == 1 and not r.models
    assert [s.layer_range for s in r.slices[0].sources] == [(0, 40), (0, 40)]
    t = r.parameters["t"]
    assert t.resolve("model.layers.3.self_attn.q_proj.weight", 0.5) == 0.3
    assert t.resolve("model.layers.3.mlp.up_proj.weight", 0.5) == 0.7
    assert t.resolve("model.norm.weight", 0.5) == 0.5

    r = parse_recipe(DOC_EXAMPLES["ties"])
    assert r.base_model == "TheBloke/Llama-2-13B-fp16" and r.parameters["int8_mask"].resolve("x", 0) is True
    assert r.models[0].parameters["density"].resolve("x", 0.5) == pytest.approx(0.7)
    assert r.models[2].parameters["weight"].resolve("model.layers.0.mlp.up_proj.weight", 0) == 0.5
    assert r.models[2].parameters["weight"].resolve("model.layers.0.self_attn.q_proj.weight", 0) == 0.0

    r = parse_recipe(DOC_EXAMPLES["passthrough"])
    assert [s.sources[0].layer_range for s in r.slices] == [(0, 24), (20, 40)]
    assert parse_recipe(DOC_EXAMPLES["bio-merge"]).method.random
    assert parse_recipe(DOC_EXAMPLES["model_stock"]).parameters["filter_wise"].resolve("x", 0) is False
    r = parse_recipe(DOC_EXAMPLES["breadcrumbs"])
    assert r.tokenizer_source == "base" and r.models[0].parameters["gamma"].resolve("x", 0) == 0.01


def test_gradient_and_filter_resolution():
    assert interpolate((0.0, 0.5, 0.3, 0.7, 1.0), 0.25) == 0.5  # on a point
    assert interpolate((0.0, 1.0), 0.3) == pytest.approx(0.3)  # between two points
    assert interpolate((0.0, 0.5, 1.0, 0.0), 0.5) == pytest.approx(0.75)  # 1.5 points in: halfway 0.5 -> 1.0
    assert interpolate((True, False), 0.4) is True and interpolate((True, False), 1.0) is False  # discrete
    s = Setting((Conditional(1.0, "self_attn"), Conditional((0.0, 1.0), "mlp")))
    assert s.resolve("model.layers.2.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert s.resolve("model.norm.weight", 0.0) is None  # no entry matches: a less specific scope decides
    assert parse_recipe("""
models: [{model: a, parameters: {weight: 1e-3}}]
merge_method: linear
""").models[0].parameters["weight"].resolve("x", 0) == 0.001  # YAML 1.1 reads 1e-3 as a string


def test_plan_resolves_gradients_per_layer_and_precedence(zoo):
    text = _recipe("""
models:
  - model: {deep}
    parameters:
      weight:
        - filter: mlp
          value: [0, 1]
  - model: {deep2}
merge_method: linear
parameters:
  weight: 2.0
  normalize: false
""", zoo)
    with Reader() as reader:
        plan = plan_merge(parse_recipe(text), reader)
    by_name = {tp.name: tp for tp in plan.tensors}
    for layer in range(5):
        mlp = by_name[f"model.layers.{layer}.mlp.up_proj.weight"]
        assert mlp.inputs[0].params["weight"] == pytest.approx(layer / 4)  # gradient over 5 layers
        assert mlp.inputs[1].params["weight"] == 2.0  # the top-level value
        attn = by_name[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert attn.inputs[0].params["weight"] == 2.0  # filter does not match: falls through to the top level
        assert mlp.shared["normalize"] is False
    assert by_name["model.embed_tokens.weight"].inputs[0].params["weight"] == 2.0

    slerp = _recipe("""
slices:
  - sources:
      - model: {deep}
        layer_range: [0, 5]
      - model: {deep2}
        layer_range: [0, 5]
merge_method: slerp
base_model: {deep}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""", zoo)
    with Reader() as reader:
        plan = plan_merge(parse_recipe(slerp), reader)
    by_name = {tp.name: tp for tp in plan.tensors}
    for layer, (a, m) in enumerate(zip([0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0])):
        assert by_name[f"model.layers.{layer}.self_attn.k_proj.weight"].shared["t"] == pytest.approx(a)
        assert by_name[f"model.layers.{layer}.mlp.down_proj.weight"].shared["t"] == pytest.approx(m)
        assert by_name[f"model.layers.{layer}.input_layernorm.weight"].shared["t"] == 0.5
        assert by_name[f"model.layers.{layer}.self_attn.k_proj.weight"].base_index == 0


@pytest.mark.parametrize(("text", "match"), [
    ("merge_methd: linear\nmodels: [{model: a}]", "'merge_methd'"),
    ("merge_method: frankenstein\nmodels: [{model: a}]", "'frankenstein'"),
    ("merge_method: della\nmodels: [{model: a}]", "'della'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, desnity: 0.5}}]", "'desnity'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}, weigth: 2}]", "'weigth'"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters:\n  t:\n"
     "    - pattern: self_attn\n      value: 0.3\n    - value: 0.5", "'pattern'"),  # mergekit would ignore it
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, normalize: false}}]", "'normalize'"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: a, parameters: {weight: 1}}, {model: b}]", "'weight'"),
    ("merge_method: linear\nmodules: {}\nmodels: [{model: a}]", "'modules'"),
    ("merge_method: linear\ntokenizer_source: union\nmodels: [{model: a}]", "union"),
    ("merge_method: linear\ntokenizer: {source: base, pad_to_multiple_of: 64}\nmodels: [{model: a}]",
     "'pad_to_multiple_of'"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]", "layer_range"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: abc}}]", "'abc'"),
    ("merge_method: linear\ndtype: float8\nmodels: [{model: a}]", "float8"),
    ("merge_method: linear\nmodels: [{model: a}]\nslices: []", "exactly one"),
])
def test_recipe_refusals_name_the_problem(text, match):
    with pytest.raises(UserError, match=match):
        parse_recipe(text)


def test_merge_refusals(zoo, tmp_path):
    def refused(template: str, match: str):
        with pytest.raises(UserError, match=match):
            merge(parse_recipe(_recipe(template, zoo)), tmp_path / "out")

    refused("merge_method: linear\nmodels: [{model: '{base}', parameters: {weight: 1}}, "
            "{model: '{wide}', parameters: {weight: 1}}]", r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shapes")
    refused("merge_method: linear\nmodels: [{model: '{base}', parameters: {weight: 1}}, "
            "{model: '{bias}', parameters: {weight: 1}}]", r"'mlp\.down_proj\.bias'.*missing")
    refused("merge_method: linear\nmodels: [{model: '{base}', parameters: {weight: 1}}, "
            "{model: '{other_tok}', parameters: {weight: 1}}]", "tokenizer_source")
    refused("merge_method: linear\nmodels: [{model: '{base}', parameters: {weight: 1}}, {model: '{a}'}]",
            r"'weight' of .*\ba\b")
    refused("merge_method: slerp\nbase_model: '{base}'\nparameters: {t: 0.5}\nmodels: [{model: '{a}'}, "
            "{model: '{b}'}]", "exactly 2")
    refused("merge_method: model_stock\nbase_model: '{base}'\nmodels: [{model: '{a}'}]", "at least 3")
    refused("merge_method: ties\nmodels: [{model: '{a}', parameters: {weight: 1}}]", "needs a base model")
    refused("merge_method: passthrough\nslices: [{sources: [{model: '{base}', layer_range: [0, 3]}]}]",
            "past its 2 layers")
    refused("merge_method: linear\nmodels: [{model: '{base}', parameters: {weight: 1}}, "
            "{model: '{deep}', parameters: {weight: 1}}]", "different numbers of layers")
    refused("merge_method: linear\nmodels: [{model: /nonexistent/model+lora, parameters: {weight: 1}}]", "lora")
    refused("merge_method: linear\ntokenizer_source: /nonexistent/tok\nmodels: [{model: '{a}', parameters: "
            "{weight: 1}}]", "tokenizer_source /nonexistent/tok is not a directory")
    with pytest.raises(UserError, match="one of the merge's inputs"):
        merge(parse_recipe(_recipe("merge_method: passthrough\nmodels: [{model: '{a}'}]", zoo)), zoo("a"))


# ---------------------------------------------------------------------------------------------------------------
# output layout, memory, resuming


def test_command_merges_a_recipe_file(zoo, tmp_path, capsys):
    from cairn.merge.commands import merge_recipe

    path = tmp_path / "recipe.yml"
    path.write_text(_recipe("merge_method: linear\nmodels: [{model: '{a}', parameters: {weight: 1}}, "
                            "{model: '{b}', parameters: {weight: 3}}]\n", zoo))
    assert merge_recipe(str(path), str(tmp_path / "out"), progress=False) == 0
    assert "merged (linear) 20 tensors, 2 layers in 1 shard(s)" in capsys.readouterr().out
    a, b = load_file(zoo("a") / "model.safetensors"), load_file(zoo("b") / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(out["model.norm.weight"], (a["model.norm.weight"] + 3 * b["model.norm.weight"]) / 4)
    with pytest.raises(UserError, match="not found"):
        merge_recipe(str(tmp_path / "missing.yml"), str(tmp_path / "out2"))


def test_passthrough_stacking_config_and_names(zoo, tmp_path):
    text = _recipe("""
slices:
  - sources:
      - model: {deep}
        layer_range: [0, 3]
  - sources:
      - model: {deep2}
        layer_range: [1, 5]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
merge_method: passthrough
""", zoo)
    result = merge(parse_recipe(text), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7 == result.layers
    out = _tensors(tmp_path / "out")
    src1, src2 = load_file(zoo("deep") / "model.safetensors"), load_file(zoo("deep2") / "model.safetensors")
    assert {int(n.split(".")[2]) for n in out if n.startswith("model.layers.")} == set(range(7))
    for j, (src, i) in enumerate([(src1, 0), (src1, 1), (src1, 2), (src2, 1), (src2, 2), (src2, 3), (src2, 4)]):
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{j}.{rest}"], src[f"model.layers.{i}.{rest}"])
        scale = 0.5 if j >= 3 else 1.0
        torch.testing.assert_close(out[f"model.layers.{j}.self_attn.o_proj.weight"],
                                   src[f"model.layers.{i}.self_attn.o_proj.weight"] * scale)
    assert torch.equal(out["model.embed_tokens.weight"], src1["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["model.norm.weight"], src2["model.norm.weight"])  # last slice's
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (zoo("deep") / "tokenizer.json").read_bytes()

    from cairn.config import ModelConfig
    from cairn.models.checkpoint import load_stage

    stage = load_stage(tmp_path / "out", ModelConfig.from_hf_dir(tmp_path / "out"))  # cairn's loader takes it
    assert len(stage.layers) == 7


def test_memory_bound_few_tensors_live(zoo, tmp_path, monkeypatch):
    """Every input tensor read is dropped once its output tensor is merged: never more live than one tensor's
    inputs (3 here), although the three models hold 60 tensors."""
    live: weakref.WeakSet = weakref.WeakSet()
    reads, peak = [], [0]
    original = Reader.read

    def counting(self, ckpt, name):
        t = original(self, ckpt, name)
        live.add(t)
        reads.append(name)
        peak[0] = max(peak[0], len(live))
        return t

    monkeypatch.setattr(Reader, "read", counting)
    text = _recipe("""
models:
  - model: {ft1}
    parameters: {weight: 0.5, density: 0.5}
  - model: {ft2}
    parameters: {weight: 0.5, density: 0.5}
merge_method: ties
base_model: {base}
""", zoo)
    result = merge(parse_recipe(text), tmp_path / "out", shard_bytes=64 * 1024)
    assert len(reads) == 3 * result.tensors == 60
    assert peak[0] <= 3
    assert result.shards > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_shards_metadata_and_resume(zoo, tmp_path):
    text = _recipe("""
models:
  - model: {ft1}
    parameters: {weight: 0.6, density: 0.5}
  - model: {ft2}
    parameters: {weight: 0.4, density: 0.5}
merge_method: dare_ties
base_model: {base}
""", zoo)
    out = tmp_path / "out"
    first = merge(parse_recipe(text), out, shard_bytes=100_000)
    assert first.shards > 1 and first.resumed_shards == 0 and first.seed is not None
    index = json.loads((out / "model.safetensors.index.json").read_text())
    before = _tensors(out)
    assert set(index["weight_map"]) == set(before)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in before.values())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as f:
            info = json.loads(f.metadata()["cairn_merge"])
        assert info == {"method": "dare_ties", "recipe": text, "seed": first.seed}

    victim = sorted(set(index["weight_map"].values()))[1]
    (out / victim).unlink()  # an interrupted run: one shard never written
    again = merge(parse_recipe(text), out, shard_bytes=100_000)  # no seed given: the recorded one is reused
    assert again.resumed_shards == first.shards - 1 and again.seed == first.seed
    after = _tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)

    other = merge(parse_recipe(text), tmp_path / "other", seed=first.seed)  # one shard; same seed, same tensors
    assert other.shards == 1 and not list((tmp_path / "other").glob("*.index.json"))
    assert all(torch.equal(before[k], v) for k, v in _tensors(tmp_path / "other").items())


# ---------------------------------------------------------------------------------------------------------------
# mergekit as the oracle

ORACLE = {
    "linear": """
models:
  - model: {ft1}
    parameters:
      weight: [0.2, 0.6]
  - model: {ft2}
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.3
  - model: {a}
    parameters: {weight: 0.1}
merge_method: linear
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {a}
        layer_range: [0, 2]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.9]
    - filter: mlp
      value: [1, 0.3]
    - value: 0.4
""",
    "slerp-finetune": """
models:
  - model: {base}
  - model: {ft1}
merge_method: slerp
base_model: {base}
parameters:
  t: 0.35
""",
    "task_arithmetic": """
models:
  - model: {ft1}
    parameters: {weight: 0.7}
  - model: {ft2}
    parameters: {weight: -0.4}
  - model: {ft3}
    parameters: {weight: [0.5, 1.5]}
merge_method: task_arithmetic
base_model: {base}
parameters:
  lambda: 1.3
  normalize: true
""",
    "ties": """
models:
  - model: {ft1}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {ft2}
    parameters:
      density: 0.5
      weight: [0.2, 0.8]
  - model: {ft3}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.1
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
""",
    "ties-rescaled": """
models:
  - model: {ft1}
    parameters: {density: 0.4, weight: 0.6}
  - model: {ft2}
    parameters: {density: 0.6, weight: 0.5}
merge_method: ties
base_model: {base}
parameters: {rescale: true, normalize: false, lambda: 0.9}
""",
    "breadcrumbs": """
models:
  - model: {ft1}
    parameters: {density: 0.6, weight: 0.7, gamma: 0.05}
  - model: {ft2}
    parameters: {density: 0.8, weight: 0.4}
merge_method: breadcrumbs
base_model: {base}
parameters: {rescale: true}
""",
    "breadcrumbs_ties": """
models:
  - model: {ft1}
    parameters: {density: 0.5, weight: 0.7, gamma: 0.1}
  - model: {ft2}
    parameters: {density: 0.7, weight: 0.4}
merge_method: breadcrumbs_ties
base_model: {base}
parameters: {normalize: true}
""",
    "model_stock": """
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
merge_method: model_stock
base_model: {base}
""",
    "model_stock-filter_wise": """
models:
  - model: {ft1}
  - model: {ft2}
merge_method: model_stock
base_model: {base}
parameters: {filter_wise: true}
""",
    "passthrough": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
  - sources:
      - model: {a}
        layer_range: [1, 2]
        parameters: {scale: 0.5}
  - sources:
      - model: {b}
        layer_range: [0, 1]
merge_method: passthrough
""",
    "tokenizer_source-base": """
models:
  - model: {base}
    parameters: {weight: 0.2}
  - model: {ft1}
    parameters: {weight: 0.3}
  - model: {other_tok}
    parameters: {weight: 0.5}
merge_method: linear
base_model: {base}
tokenizer_source: base
""",
    "tokenizer_source-model": """
models:
  - model: {ft1}
    parameters: {weight: 0.6, density: 0.5}
  - model: {other_tok}
    parameters: {weight: 0.4, density: 0.7}
merge_method: ties
base_model: {base}
tokenizer_source: {other_tok}
""",
    "ties-bfloat16": """
models:
  - model: {ft1}
    parameters: {density: 0.5, weight: 0.7}
  - model: {ft2}
    parameters: {density: 0.3, weight: 0.4}
merge_method: ties
base_model: {base}
dtype: bfloat16
""",
    "slerp-bfloat16": """
models:
  - model: {base}
  - model: {a}
merge_method: slerp
base_model: {base}
parameters: {t: [0.3, 0.8]}
dtype: bfloat16
""",
    "model_stock-float16-out": """
models:
  - model: {ft1}
  - model: {ft2}
merge_method: model_stock
base_model: {base}
out_dtype: float16
""",
    "tied-and-untied": """
models:
  - model: {base}
    parameters: {weight: 0.6}
  - model: {untied}
    parameters: {weight: 0.4}
merge_method: linear
""",
}


def _mergekit(text: str, out, seed: int = 0) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), MergeOptions(quiet=True, random_seed=seed, write_model_card=False))


@pytest.mark.parametrize("case", list(ORACLE))
def test_matches_mergekit(case, zoo, tmp_path):
    text = _recipe(ORACLE[case], zoo)
    _mergekit(text, tmp_path / "mergekit")
    merge(parse_recipe(text), tmp_path / "cairn")
    theirs, ours = _tensors(tmp_path / "mergekit"), _tensors(tmp_path / "cairn")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        torch.testing.assert_close(ours[name], t, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    cfg_theirs = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    cfg_ours = json.loads((tmp_path / "cairn" / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size", "hidden_size"):
        assert cfg_ours[key] == cfg_theirs[key], key
    if case != "passthrough":  # a real merge: a layer matrix differs from every input's
        name = "model.layers.1.self_attn.q_proj.weight"
        inputs = [load_file(p / "model.safetensors")[name] for p in map(zoo, ("base", "ft1", "a"))]
        assert all(not torch.allclose(ours[name].float(), x) for x in inputs)
    if case == "tied-and-untied":  # the head is its own tensor now: the config must not tie it back
        assert "lm_head.weight" in ours and cfg_ours["tie_word_embeddings"] is False


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_statistics_match_mergekit(method, zoo, tmp_path):
    """Random drops cannot match element for element (different generators), so compare what they promise: the
    kept fraction of each delta is the density, kept elements are rescaled by one factor that restores the L1 norm
    (mergekit 0.1.5's rescale), dropped elements are the base's."""
    text = _recipe(f"""
models:
  - model: {{ft1}}
    parameters: {{density: 0.3, weight: 1.0}}
merge_method: {method}
base_model: {{base}}
""", zoo)
    _mergekit(text, tmp_path / "mergekit", seed=3)
    merge(parse_recipe(text), tmp_path / "cairn", seed=3)
    base, ft = load_file(zoo("base") / "model.safetensors"), load_file(zoo("ft1") / "model.safetensors")
    for out in (_tensors(tmp_path / "mergekit"), _tensors(tmp_path / "cairn")):
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                     "model.layers.1.self_attn.q_proj.weight"):
            delta, merged = ft[name] - base[name], out[name] - base[name]
            kept = merged != 0
            assert abs(kept.float().mean().item() - 0.3) < 0.02, name
            scale = merged.abs().sum() / delta[kept].abs().sum()  # one factor for every kept element
            torch.testing.assert_close(merged[kept], scale * delta[kept], rtol=0, atol=1e-6)
            assert abs(scale.item() * 0.3 - 1) < 0.1, name  # ~1/density
            torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)  # L1 restored
    ours_a = _tensors(tmp_path / "cairn")
    merge(parse_recipe(text), tmp_path / "cairn2", seed=3)
    assert all(torch.equal(ours_a[k], v) for k, v in _tensors(tmp_path / "cairn2").items())  # seeded: repeatable

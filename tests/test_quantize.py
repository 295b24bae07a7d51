"""Quantized weights: formats against hand-computed values and the gguf package's Q4_0 quantizer, torch's int8/int4
kernels against the dequantized matmul, quantized checkpoints against their dequantized twins, the CLI end to end
and its refusals, placement by quantized bytes."""

import json

import gguf
import pytest
import torch
from safetensors import safe_open

from cairn.cli import main
from cairn.config import EngineConfig, ModelConfig, SamplingParams
from cairn.engine.api import LLM
from cairn.models.checkpoint import load_stage
from cairn.models.init import init_model
from cairn.models.llama import full_forward
from cairn.models.quantize import dequantize_checkpoint
from cairn.models.quantized import quant_config, stored_bytes
from cairn.pool.partition import DeviceSpec, ModelShape, PlacementError, partition
from cairn.quant.layers import QuantEmbedding, QuantLinear
from cairn.quant.weights import (
    QuantFormat,
    QuantFormatError,
    QuantizedWeight,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)

# ----- formats against hand-computed values


def test_int8_is_round_of_w_over_max_abs_over_127_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.1, -0.2, 0.3]])
    qw = quantize(w, QuantFormat(8))
    s = torch.tensor([2 / 127, 0.0, 0.3 / 127])
    assert torch.allclose(qw.scales, s)
    # 1 / (2/127) = 63.5 rounds to even (64); 0.5 / (2/127) = 31.75 -> 32
    assert qw.qweight.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [127, 42, -85, 127]]
    assert qw.qweight.dtype == torch.int8 and qw.zeros is None
    assert torch.allclose(dequantize(qw), qw.qweight.float() * s[:, None])


def test_int4_asymmetric_codes_and_values_on_an_exact_grid():
    # a group whose values lie on the grid min + 0.25 c (exact in binary): s = 0.25, zero point = min + 8 s
    codes = torch.tensor([0, 15, 3, 8, 1, 14, 7, 9] * 4)
    w = (-1.0 + 0.25 * codes.float())[None]  # (1, 32)
    qw = quantize(w, QuantFormat(4, 32, symmetric=False))
    assert qw.scales.tolist() == [[0.25]] and qw.zeros.tolist() == [[1.0]]
    assert unpack_int4(qw.qweight).tolist() == [codes.tolist()]
    assert torch.equal(dequantize(qw), w)


def test_int4_symmetric_scale_takes_the_sign_of_the_largest_magnitude():
    neg = torch.tensor([-2.0, 1.75, 0.5, -0.25] * 8)[None]  # largest |w| is -2: s = -2 / -8 = 0.25, -2 -> code 0
    qw = quantize(neg, QuantFormat(4, 32, symmetric=True))
    assert qw.scales.tolist() == [[0.25]] and qw.zeros is None
    assert unpack_int4(qw.qweight)[0, :4].tolist() == [0, 15, 10, 7]  # round(w / s) + 8
    pos = -neg  # largest |w| is +2: s = -0.25, +2 -> code 0, -1.75 -> code 15
    qp = quantize(pos, QuantFormat(4, 32, symmetric=True))
    assert qp.scales.tolist() == [[-0.25]] and unpack_int4(qp.qweight)[0, :2].tolist() == [0, 15]
    assert torch.equal(dequantize(qw), neg) and torch.equal(dequantize(qp), pos)


def test_int4_groups_have_their_own_scales_and_a_constant_group_is_exact():
    w = torch.cat([torch.full((2, 32), 0.7), torch.linspace(-3, 3, 64).reshape(2, 32)], 1)  # (2, 64)
    qw = quantize(w, QuantFormat(4, 32))
    assert qw.scales.shape == (2, 2) and qw.scales[:, 0].tolist() == [0.0, 0.0]
    assert torch.equal(dequantize(qw)[:, :32], w[:, :32])  # code 8 everywhere, the zero point is the value
    assert (dequantize(qw) - w).abs().max() <= qw.scales.float().max() / 2 + 1e-6


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_symmetric_group_32_agrees_with_ggufs_q4_0():
    """An independent oracle: the gguf package's Q4_0 (the same rule, fp16 scales). Scales are rounded before the
    codes here and after in gguf, so a rare tie lands on the neighbouring code."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q = gguf.GGMLQuantizationType.Q4_0
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q), q).copy())
    ours = dequantize(quantize(w, QuantFormat(4, 32, symmetric=True, scale_dtype="float16")))
    assert (ours == ref).float().mean() > 0.999
    assert abs((ours - w).abs().mean() / (ref - w).abs().mean() - 1) < 1e-3


@pytest.mark.parametrize("fmt, bpw, nbytes", [
    (QuantFormat(8), 8.0, 64 * 128 + 64 * 4),
    (QuantFormat(4, 32, True, "bfloat16"), 4.5, 64 * 64 + 64 * 4 * 2),
    (QuantFormat(4, 64, False, "bfloat16"), 4.5, 64 * 64 + 64 * 2 * 2 * 2),
    (QuantFormat(4, 128, False, "float32"), 4.5, 64 * 64 + 64 * 1 * 4 * 2),
])
def test_stored_bytes(fmt, bpw, nbytes):
    assert fmt.bits_per_weight() == bpw and fmt.stored_bytes(64, 128) == nbytes
    assert quantize(torch.randn(64, 128), fmt).nbytes() == nbytes


@pytest.mark.parametrize("args, needle", [
    ((3, None), "--bits must be 8 or 4"),
    ((4, 48), "--group-size must be one of 32, 64, 128"),
    ((4, None), "--group-size must be one of"),
    ((8, 32), "--group-size is for --bits 4"),
])
def test_bad_formats_are_refused(args, needle):
    with pytest.raises(QuantFormatError, match=needle):
        QuantFormat(*args)


def test_a_width_that_does_not_divide_names_the_tensor_and_the_sizes_that_fit():
    with pytest.raises(QuantFormatError, match="w has 96 input columns.*groups of 64; use --group-size 32"):
        quantize(torch.randn(4, 96), QuantFormat(4, 64), "w")
    with pytest.raises(QuantFormatError, match="no int4 group size divides it; keep it unquantized"):
        quantize(torch.randn(4, 176), QuantFormat(4, 32), "w")


# ----- kernels against the dequantized matmul

FORMATS = [QuantFormat(8), QuantFormat(4, 32, True, "bfloat16"), QuantFormat(4, 64), QuantFormat(4, 128)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f.bits}-g{f.group_size}-{'sym' if f.symmetric else 'asym'}")
@pytest.mark.parametrize("rows", [96, 40])  # 40: not a multiple of the int4 CPU kernel's 16-row blocks (padded)
def test_quant_linear_matches_the_dequantized_matmul(fmt, rows):
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(rows, 256, generator=g), torch.randn(rows, generator=g), torch.randn(2, 5, 256, generator=g)
    qw = quantize(w, fmt)
    ref = x @ dequantize(qw).T + b
    m = QuantLinear(qw, b, "cpu")
    assert m.kind == f"int{fmt.bits}" and m.act_dtype == torch.bfloat16  # torch's kernel, not the fallback
    y = m(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, rows)
    # bf16 activations and outputs: 8 significant bits, so within 1% of the largest output
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    m.act_dtype = torch.float32  # the same kernel in fp32: only the summation order differs
    assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_quant_embedding_is_the_dequantized_rows():
    qw = quantize(torch.randn(50, 64), QuantFormat(4, 32))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(QuantEmbedding(qw, "cpu", torch.float32)(ids), dequantize(qw)[ids])


def test_a_weight_that_starts_mid_buffer_is_copied_before_the_int8_kernel_reads_it():
    """torch's int8 CPU kernel crashes on a misaligned weight (safetensors hands out such tensors)."""
    buf = torch.randint(-127, 127, (64 * 64 + 7,), dtype=torch.int8)
    q = buf[7:].view(64, 64)
    m = QuantLinear(QuantizedWeight(8, None, q, torch.rand(64) / 100), None, "cpu")
    x = torch.randn(8, 64)
    ref = x @ (q.float() * m.scales[:, None]).T
    assert (m(x) - ref).abs().max() <= 1e-2 * ref.abs().max()


# ----- checkpoints


def _quantize(src, out, *args):
    assert main(["quantize", str(src), str(out), *args]) == 0
    return out


def _reference_mode(llm):
    """Run the quantized kernels in fp32 (the same integers and scales, fp32 activations)."""
    for stage in llm.runner.stages:
        for m in stage.modules():
            if isinstance(m, QuantLinear):
                m.act_dtype = torch.float32


def test_int8_model_greedy_output_equals_its_dequantized_twin(tiny_model, tmp_path):
    q = _quantize(tiny_model, tmp_path / "q8", "--bits", "8")
    twin = tmp_path / "twin"
    dequantize_checkpoint(q, twin)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["The river", "Once upon a time there", "a"]
    with LLM(twin, EngineConfig(max_seqs=4)) as llm:
        want = [c.token_ids for c in llm.generate(prompts, params)]
    with LLM(q, EngineConfig(max_seqs=4)) as llm:
        assert isinstance(llm.runner.stages[0].layers[0].mlp.down_proj, QuantLinear)
        fast = [c.token_ids for c in llm.generate(prompts, params)]
        _reference_mode(llm)
        assert [c.token_ids for c in llm.generate(prompts, params)] == want
    assert fast == want  # bf16 activations do not change this model's greedy choices


def _logits(path, ids, fp32_kernels=False):
    stage = load_stage(path, ModelConfig.from_hf_dir(path))
    if fp32_kernels:
        for m in stage.modules():
            if isinstance(m, QuantLinear):
                m.act_dtype = torch.float32
    with torch.no_grad():
        return full_forward(stage, ids)


@pytest.fixture(scope="module")
def tiny192(tmp_path_factory):
    """The tiny shape with an MLP width of 192, so every matrix divides into groups of 32 and 64."""
    path = tmp_path_factory.mktemp("tiny192")
    init_model(path, shape="tiny", seed=1, init_std=0.1, intermediate_size=192)
    return path


def _gguf_rounded(path, qtype):
    """The model with every matrix quantized and dequantized by the gguf package (llama.cpp's formats)."""
    from cairn.models.checkpoint import build_stage, read_tensors, stage_tensor_names
    from cairn.models.quantized import is_matrix
    from cairn.types import LayerRange

    cfg = ModelConfig.from_hf_dir(path)
    tensors = read_tensors(path, stage_tensor_names(cfg, LayerRange(0, cfg.num_layers)))
    for n, t in tensors.items():
        if is_matrix(n):
            tensors[n] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype).copy())
    return build_stage(cfg, LayerRange(0, cfg.num_layers), tensors)


@pytest.mark.parametrize("args, qtype", [([], "Q4_1"), (["--symmetric"], "Q4_0")])
def test_int4_model_is_its_twin_and_as_close_to_the_original_as_llama_cpps_format(tiny192, tmp_path, args, qtype):
    q = _quantize(tiny192, tmp_path / "q4", "--bits", "4", "--group-size", "32", *args)
    twin = tmp_path / "twin"
    dequantize_checkpoint(q, twin)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ref, twin_logits = _logits(tiny192, ids), _logits(twin, ids)
    assert (_logits(q, ids, fp32_kernels=True) - twin_logits).abs().max() < 1e-4 * twin_logits.abs().max()
    fast = _logits(q, ids)
    assert (fast - twin_logits).abs().max() < 2e-2 * twin_logits.abs().max()  # bf16 activations
    # the same bits and groups as llama.cpp's Q4_1 / Q4_0 move the logits as much (random weights: a lot)
    with torch.no_grad():
        theirs = full_forward(_gguf_rounded(tiny192, getattr(gguf.GGMLQuantizationType, qtype)), ids)
    assert (fast - ref).abs().mean() < 1.05 * (theirs - ref).abs().mean()


def test_quantize_cli_writes_a_checkpoint_that_generate_and_eval_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_model), str(out), "--bits", "4", "--group-size", "32",
                 "--keep", "down_proj"]) == 0
    assert "int4 g32" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc | {"not_quantized": None} == {
        "quant_method": "cairn", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": False,
        "scale_dtype": "bfloat16", "keep": ["down_proj"], "not_quantized": None}
    assert qc["not_quantized"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    with safe_open(out / "model.safetensors", "pt") as f:
        names, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.uint8
    assert json.loads(meta["cairn_quantization"]) == qc
    assert {"model.embed_tokens.qweight", "model.embed_tokens.scales", "model.embed_tokens.zeros",
            "model.layers.1.mlp.down_proj.weight"} <= names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert main(["generate", str(out), "--prompt", "The river", "--max-tokens", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8
    text = tmp_path / "text.txt"
    text.write_text("The river runs past the old mill and the boats wait for the tide to turn. " * 4)
    assert main(["eval", str(out), "--perplexity", str(text), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"]["quantization"] == "cairn"
    # export hands llama.cpp the weights the checkpoint stands for
    assert main(["export", str(out), str(tmp_path / "q.gguf"), "--type", "f32"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    with safe_open(out / "model.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        emb = QuantizedWeight(4, 32, *(f.get_tensor(f"model.embed_tokens.{k}") for k in ("qweight", "scales", "zeros")))
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].data.copy()), dequantize(emb))
    assert torch.equal(torch.from_numpy(tensors["blk.1.ffn_down.weight"].data.copy()), down)


def test_keep_on_a_tied_head_keeps_the_shared_embedding(tiny_model, model_factory, tmp_path):
    tied = quant_config(ModelConfig.from_hf_dir(_quantize(tiny_model, tmp_path / "a", "--bits", "8", "--keep", "lm_head")))
    assert tied.not_quantized == ("model.embed_tokens.weight",)
    untied = model_factory("llama-untied")
    q = _quantize(untied, tmp_path / "b", "--bits", "8", "--keep", "lm_head,q_proj")
    qc = quant_config(ModelConfig.from_hf_dir(q))
    # q_proj is fused with k and v: the three are kept together
    assert set(qc.not_quantized) == {"lm_head.weight"} | {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"}
    stage = load_stage(q, ModelConfig.from_hf_dir(q))
    assert isinstance(stage.lm_head, torch.nn.Linear) and isinstance(stage.embed_tokens, QuantEmbedding)
    assert isinstance(stage.layers[0].self_attn.qkv_proj, torch.nn.Linear)


@pytest.mark.parametrize("args, needle", [
    (["--bits", "4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
    (["--bits", "4", "--group-size", "32"], "down_proj.weight has 176 input columns"),
    (["--bits", "8", "--method", "fancy"], "unknown --method 'fancy'"),
    (["--bits", "8", "--keep", "lm_hed"], "--keep 'lm_hed' matches no matrix"),
    (["--bits", "8", "--group-size", "64"], "--group-size is for --bits 4"),
    (["--bits", "8", "--calibration", "x.txt"], "--calibration is for the calibrated methods"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tiny_model, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_an_already_quantized_model_or_a_used_output_is_refused(tiny_model, tmp_path, capsys):
    q = _quantize(tiny_model, tmp_path / "q", "--bits", "8")
    capsys.readouterr()
    assert main(["quantize", str(q), str(tmp_path / "again"), "--bits", "4"]) == 2
    assert "is already quantized (int8 rtn)" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    assert main(["quantize", str(tiny_model), str(tmp_path / "used"), "--bits", "8"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["x"]
    assert main(["train", "--recipe", "pretrain", "--model", str(q), "--data", str(tmp_path / "used" / "x"),
                 "--out", str(tmp_path / "t")]) == 2
    assert "quantized checkpoint" in capsys.readouterr().err


def test_stages_split_across_a_pool_compute_what_the_whole_model_does(tiny_model, tmp_path):
    """What a pool stage loads: only its tensors (the quantized parts of its matrices), the tied head on the last
    stage rebuilt from the embedding's quantized parts."""
    from cairn.models.checkpoint import build_stage, read_tensors, stage_tensor_names
    from cairn.models.llama import CausalContext
    from cairn.types import LayerRange

    q = _quantize(tiny_model, tmp_path / "q4", "--bits", "4", "--group-size", "64", "--keep", "down_proj")
    cfg = ModelConfig.from_hf_dir(q)
    first, last = LayerRange(0, 1), LayerRange(1, 2)
    assert "model.embed_tokens.qweight" in stage_tensor_names(cfg, last)  # the tied head's weight
    assert "model.embed_tokens.weight" not in stage_tensor_names(cfg, first)
    stages = [build_stage(cfg, r, read_tensors(q, stage_tensor_names(cfg, r))) for r in (first, last)]
    assert isinstance(stages[1].lm_head, QuantLinear) and stages[1].embed_tokens is None
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    ctx = CausalContext(cfg, 1, 12, "cpu")
    with torch.no_grad():
        split = stages[1](stages[0](ids, ctx), ctx)
    assert torch.equal(split, _logits(q, ids))


def test_placement_uses_the_quantized_bytes(tiny_model, tmp_path):
    cfg = ModelConfig.from_hf_dir(tiny_model)
    q4 = ModelConfig.from_hf_dir(_quantize(tiny_model, tmp_path / "q4", "--bits", "4", "--keep", "down_proj"))
    full = ModelShape.from_config(cfg, 4, 64, 1, 8)
    small = ModelShape.from_config(q4, 4, 64, 1, 8, stored=stored_bytes(q4, 4))
    d, f = cfg.hidden_size, cfg.intermediate_size
    # per block: q/k/v/o/gate/up at 4 bits + bf16 scale and zero per 32 columns, down_proj and norms in fp32
    quant = (cfg.q_size + 2 * cfg.kv_size + d + 2 * f) * d
    assert small.layer_bytes == quant // 2 + quant // 32 * 4 + d * f * 4 + 2 * d * 4
    assert small.embed_bytes == cfg.vocab_size * d // 2 + cfg.vocab_size * d // 32 * 4
    assert stored_bytes(cfg, 4) is None
    need = partition(small, [DeviceSpec("a", 2**40, 1e10, 1e10)]).stages[0].memory
    device = [DeviceSpec("a", need, 1e10, 1e10)]  # holds the int4 model, not the fp32 one
    with pytest.raises(PlacementError):
        partition(full, device)
    assert partition(small, device).stages[0].layers.end == cfg.num_layers


# ----- calibration


def _correlated_inputs(k: int, n: int = 4096):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, k, generator=g) @ (0.1 * torch.randn(k, k, generator=g) + torch.eye(k))
    x[:, :8] *= 10  # a few channels carry large activations, as in real models
    return x


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With H = I there is nothing to compensate through: every column rounds as RTN rounds it."""
    from cairn.models.calibrate import gptq_quantize

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    for fmt in (QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 64, True, "bfloat16")):
        got, want = gptq_quantize(w, torch.eye(128), fmt), quantize(w, fmt)
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("fmt", [QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 64, True, "bfloat16")])
def test_gptq_lowers_the_output_error_rtn_leaves_on_its_inputs(fmt):
    from cairn.models.calibrate import gptq_quantize

    x = _correlated_inputs(256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    err = {name: ((x @ dequantize(q).T - x @ w.T) ** 2).mean()
           for name, q in {"gptq": gptq_quantize(w, x.T @ x, fmt), "rtn": quantize(w, fmt)}.items()}
    assert err["gptq"] < 0.5 * err["rtn"]


def test_awq_scaling_keeps_the_float_function_and_lowers_the_quantized_error(tiny192):
    from cairn.models.calibrate import _awq_block, _Inputs
    from cairn.models.llama import CausalContext
    from cairn.models.quantized import QuantConfig

    cfg = ModelConfig.from_hf_dir(tiny192)
    stage = load_stage(tiny192, cfg)
    block = stage.layers[0]
    x = stage.embed_tokens(torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(5)))
    x[..., :4] *= 20  # outlier channels, as real activations have
    ctx = CausalContext(cfg, 4, 64, "cpu")
    fmt = QuantFormat(4, 32)
    with torch.no_grad():
        hooks = _Inputs(block, keep_rows=True)
        before = block(x, ctx)
        hooks.close()
        xin = torch.cat(hooks.rows["mlp.gate_up_proj"])
        rtn_err = ((xin @ fake(block.mlp.gate_up_proj.weight, fmt).T - xin @ block.mlp.gate_up_proj.weight.T) ** 2).mean()
        norm = block.post_attention_layernorm.weight.clone()
        exponents = _awq_block(cfg, block, hooks.rows, 0, QuantConfig(fmt, "awq"))
        assert len(exponents) == 3  # q/k/v, gate/up, down (o_proj: grouped-query attention, not scaled)
        assert torch.allclose(block(x, ctx), before, rtol=1e-4, atol=1e-4 * before.abs().max())
        s = norm / block.post_attention_layernorm.weight  # the scales folded into the norm
        xs = xin / s
        w = block.mlp.gate_up_proj.weight
        awq_err = ((xs @ fake(w, fmt).T - xin @ (w / s).T) ** 2).mean()
    assert awq_err <= rtn_err


def fake(w, fmt):
    from cairn.quant.weights import fake_quantize

    return fake_quantize(w, fmt)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_through_the_cli(tiny192, tmp_path, method):
    text = tmp_path / "calib.txt"
    text.write_text("The river runs past the old mill, and the boats wait for the tide to turn. " * 40)
    q = _quantize(tiny192, tmp_path / method, "--bits", "4", "--group-size", "64", "--method", method,
                  "--calibration", str(text), "--samples", "2")
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method and qc["calibration"] == "calib.txt" and qc["samples"] == 2
    assert qc["seq_len"] == 256
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (_logits(q, ids) - _logits(tiny192, ids)).abs().mean() < 0.5 * _logits(tiny192, ids).abs().mean()


# ----- the real model


def test_smollm2_int8_perplexity_within_one_percent(smollm2_dir, tmp_path):
    from cairn.eval.commands import run_perplexity

    q = _quantize(smollm2_dir, tmp_path / "q8", "--bits", "8")
    ppl = {}
    for name, path in {"fp32": smollm2_dir, "int8": q}.items():
        with LLM(path, EngineConfig(max_seqs=1, max_context=1024)) as llm:
            ppl[name] = run_perplexity(llm, "examples/eval/heldout.txt", 1024, 512, False)["perplexity"]
    assert ppl["int8"] <= 1.01 * ppl["fp32"]

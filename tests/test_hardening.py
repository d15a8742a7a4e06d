"""Issue #10: overflowing scales, corrupt or mistyped checkpoints, atomic loads, bad inputs, and a
reproducible calibrated path. Each case here failed (silently) before the fix."""
import json

import pytest
import torch
from torch import nn

import flute
from flute import QuantLinear, quantize_weight
from flute.calibrate import activation_aware_quantize, quantize_model_calibrated
from flute.format import QuantizedWeight
from flute.gptq import gptq_quantize_weight
from flute.quantize import ScaleOverflowError, learn_table


# -- item 2: scales, offsets and tables must be finite once stored -----------------------------------
def test_fp16_weights_beyond_a_narrow_table_overflow_the_scale():
    w = torch.randn(4, 128, dtype=torch.float16)
    w[2, 70] = 40000.0
    table = torch.linspace(-0.5, 0.5, 16)  # 40000 / 0.5 = 80000 > fp16 max
    with pytest.raises(ScaleOverflowError, match=r"row 2, group 1: the scale is inf once stored as "
                                                  r"float16.*float32"):
        quantize_weight(w, 4, 64, table)


def test_one_large_weight_with_fp16_scales_overflows():
    w = torch.randn(8, 256)
    w[5, 200] = 70000.0
    with pytest.raises(ScaleOverflowError, match=r"row 5, group 3: the scale is inf"):
        quantize_weight(w, 4, 64, scale_dtype=torch.float16)
    assert torch.isfinite(quantize_weight(w, 4, 64, scale_dtype=torch.float32).scales).all()


def test_offsets_whose_range_overflows():
    w = torch.randn(3, 64)
    w[1, 0], w[1, 1] = 3e38, -3e38  # max - min is inf in float32
    with pytest.raises(ScaleOverflowError, match=r"row 1, group 0"):
        quantize_weight(w, 4, 64, offsets=True, scale_dtype=torch.float32)


def test_learned_table_on_huge_weights_is_finite_or_refused():
    w = torch.randn(16, 128).clamp(-3, 3) * 1e38  # up to 3e38: finite in float32
    table = learn_table(w, 4, 64)  # the Lloyd weights (absmax**2) no longer overflow
    assert torch.isfinite(table).all()
    qw = quantize_weight(w, 4, 64, learned_table=True)
    assert torch.isfinite(qw.table).all() and torch.isfinite(qw.scales).all()
    assert torch.isfinite(qw.dequantize(torch.float64)).all()
    with pytest.raises(ScaleOverflowError, match="row 0, group 0.*float16"):
        quantize_weight(w, 4, 64, learned_table=True, scale_dtype=torch.float16)


def test_gptq_and_activation_aware_paths_check_too():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 128, generator=g)
    w[4, 100] = 70000.0
    x = torch.randn(64, 128, generator=g)
    h = 2 * x.t() @ x / 64
    with pytest.raises(ScaleOverflowError, match=r"row 4, group 1"):
        gptq_quantize_weight(w, h, 4, 64, scale_dtype=torch.float16)
    # the importance-weighted clipping search may clip 70000 to a finite fp16 scale (that is a
    # valid result); 1e6 is beyond every clipping ratio (>= 0.75)
    qw = gptq_quantize_weight(w, h, 4, 64, learned_table=True, scale_dtype=torch.float16,
                              scale_importance=torch.diagonal(h))
    assert torch.isfinite(qw.scales).all()
    w[4, 100] = 1e6
    with pytest.raises(ScaleOverflowError, match=r"row 4, group 1"):
        gptq_quantize_weight(w, h, 4, 64, learned_table=True, scale_dtype=torch.float16,
                             scale_importance=torch.diagonal(h))
    with pytest.raises(ScaleOverflowError, match=r"row 4, group 1"):
        activation_aware_quantize(w, torch.diagonal(h), 4, 64, scale_dtype=torch.float16)


def _tiny_llama(seed=0, big=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if big is not None:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[7, 70] = big
    return model


def test_model_walkers_name_the_layer():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).half()
    with torch.no_grad():
        model[2].weight[3, 8] = 40000.0
    with pytest.raises(ScaleOverflowError, match=r"^2: row 3, group 0"):
        flute.quantize_model(model, bits=4, group_size=32, codebook=torch.linspace(-0.5, 0.5, 16),
                             skip=(), progress=False)
    for method in ("rtn", "gptq"):
        model = _tiny_llama(big=70000.0)
        samples = [torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))]
        with pytest.raises(ScaleOverflowError,
                           match=r"^model\.layers\.1\.mlp\.down_proj: row 7, group 1: the scale is inf"):
            quantize_model_calibrated(model, samples, bits=4, group_size=64, method=method,
                                      scale_dtype=torch.float16, progress=False)


def test_hf_quantize_on_load_names_the_layer(tmp_path, capfd, caplog):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from flute.integrations import huggingface as hf
    assert hf.register()
    from flute.integrations.hf_config import FluteConfig
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[2, :2] = torch.tensor([3e38, -3e38])
    model.save_pretrained(tmp_path / "fp")
    # transformers catches errors of conversion ops and raises its own after logging a report
    # that holds ours (the layer, row and group)
    with pytest.raises((ScaleOverflowError, RuntimeError)) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=FluteConfig(
            bits=4, group_size=64, offsets=True))
    text = str(info.value) + capfd.readouterr().err + caplog.text
    assert "model.layers.0.self_attn.o_proj: row 2, group 0: the scale is inf" in text, text


def test_cli_quantize_stops_with_the_layer_and_a_dtype_hint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import flute.cli as cli
    from flute.cli import main
    from transformers import AutoModelForCausalLM

    _tiny_llama(big=70000.0).save_pretrained(tmp_path / "src")

    class Tok:
        def save_pretrained(self, path):
            (tmp_path / path).joinpath("tokenizer.json").write_text("{}")
    monkeypatch.setattr(cli, "_load_unchecked", lambda s, dtype=None, device_map=None: (
        AutoModelForCausalLM.from_pretrained(s, dtype=dtype), Tok()))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "src"), str(out), "--bits", "4", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flute")]
    assert len(err) == 1, err
    err = err[0]
    assert "model.layers.1.mlp.down_proj: row 7, group 1" in err and "try --dtype float32" in err
    assert not out.exists()
    assert main(["quantize", str(tmp_path / "src"), str(out), "--bits", "4", "--no-progress",
                 "--dtype", "float32"]) == 0
    assert json.load(open(out / "config.json"))["quantization_config"]["bits"] == 4


# -- other bad inputs get clear errors --------------------------------------------------------------
def test_meta_fp8_importance_group_size_and_nan_bias_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        quantize_weight(torch.empty(8, 64, device="meta"))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        quantize_weight(torch.randn(8, 64).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_weight(torch.randn(8, 64), scale_dtype=torch.float8_e4m3fn)
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"importance must hold one value per input column \(64\)"):
        quantize_weight(w, learned_table=True, importance=torch.ones(63))
    with pytest.raises(ValueError, match=r"importance must hold one value per input column"):
        activation_aware_quantize(w, torch.ones(32), 4, 32)
    with pytest.raises(ValueError, match=r"importance must hold one value per input column"):
        gptq_quantize_weight(w, torch.eye(64), 4, 32, learned_table=True, importance=torch.ones(8))
    with pytest.raises(ValueError, match=r"scale_importance must hold one value"):
        gptq_quantize_weight(w, torch.eye(64), 4, 32, scale_importance=torch.ones(8))
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(w, 4, True)
    with pytest.raises(ValueError, match="group_size"):
        flute.QuantSpec(group_size=True)
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"bias holds a non-finite value \(nan at index 3\)"):
        QuantLinear.from_linear(lin, 4, 32)
    with pytest.raises(ValueError, match=r"^0: bias holds a non-finite value"):
        flute.quantize_model(nn.Sequential(lin), bits=4, group_size=32, skip=(), progress=False)


# -- items 3 and 4: loading checks everything first and is all or nothing ----------------------------
@pytest.fixture
def layers():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 96, generator=g) * 0.05)
    src = QuantLinear.from_linear(lin, 3, 32, offsets=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 96, generator=g) * 0.05)
    dst = QuantLinear.from_linear(lin, 3, 32, offsets=True)
    x = torch.randn(5, 96, generator=g)
    return src.state_dict(), dst, x


def _unchanged(dst, x, before, sd_before):
    assert torch.equal(dst(x), before)
    after = dst.state_dict()
    assert sorted(after) == sorted(sd_before)
    for k in after:
        assert torch.equal(after[k], sd_before[k]), k


@pytest.mark.parametrize("strict", [True, False])
def test_a_load_missing_qcodes_keeps_the_old_weight(layers, strict):
    sd, dst, x = layers
    before, sd_before = dst(x), dst.state_dict()
    partial = {k: v for k, v in sd.items() if k != "qcodes"}
    if strict:
        with pytest.raises(RuntimeError, match="Missing key.*qcodes"):
            dst.load_state_dict(partial, strict=True)
    else:
        result = dst.load_state_dict(partial, strict=False)
        assert result.missing_keys == ["qcodes"]
    _unchanged(dst, x, before, sd_before)
    dst.load_state_dict(sd)  # and a complete load afterwards works
    assert not torch.equal(dst(x), before)


def test_a_bin_checkpoint_without_qcodes_into_a_fresh_layer(layers, tmp_path):
    sd, _, x = layers
    torch.save({k: v for k, v in sd.items() if k != "qcodes"}, tmp_path / "w.bin")
    fresh = QuantLinear(96, 24, 3, 32, offsets=True, dtype=torch.float32)
    before, sd_before = fresh(x), fresh.state_dict()
    result = fresh.load_state_dict(torch.load(tmp_path / "w.bin"), strict=False)
    assert result.missing_keys == ["qcodes"]
    _unchanged(fresh, x, before, sd_before)  # not an uninitialised buffer repacked


def _corruptions(sd):
    """(tensor name, corrupted state dict) for each way of damaging one tensor."""
    nan = float("nan")
    for key in ("scales", "offsets", "table", "bias"):
        t = sd[key].clone()
        t.view(-1)[t.numel() // 2] = nan
        yield key, dict(sd, **{key: t})
    yield "table", dict(sd, table=torch.arange(8))
    yield "qmeta", dict(sd, qmeta=sd["qmeta"].float())
    yield "qcodes", dict(sd, qcodes=sd["qcodes"].to(torch.int16))
    yield "qcodes", dict(sd, qcodes=sd["qcodes"][:, :-1])
    yield "scales", dict(sd, scales=sd["scales"][:-1])


@pytest.mark.parametrize("strict", [True, False])
def test_corrupt_tensors_are_named_and_leave_the_layer_as_it_was(layers, strict):
    sd, dst, x = layers
    before, sd_before = dst(x), dst.state_dict()
    for name, bad in _corruptions(sd):
        with pytest.raises(ValueError, match=rf"^{name} "):
            dst.load_state_dict(bad, strict=strict)
        _unchanged(dst, x, before, sd_before)


def test_scales_that_overflow_the_layer_dtype_are_refused(layers):
    sd, _, x = layers
    half = QuantLinear(96, 24, 3, 32, offsets=True, dtype=torch.float16)
    big = dict(sd, scales=sd["scales"] * 1e6)  # finite in float32, inf once stored as float16
    with pytest.raises(ValueError, match="scales holds a non-finite value once converted to float16"):
        half.load_state_dict(big)


def test_prefixed_keys_in_a_model_are_named(layers):
    sd, dst, x = layers
    model = nn.Sequential(nn.Identity(), dst)
    bad = {f"1.{k}": v for k, v in sd.items()}
    bad["1.table"] = bad["1.table"].clone()
    bad["1.table"][0] = float("inf")
    with pytest.raises(ValueError, match=r"^1\.table holds a non-finite value \(inf at index 0\)"):
        model.load_state_dict(bad)


def test_hf_checkpoints_with_bad_values_or_dtypes_are_named(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from flute.integrations import huggingface as hf
    assert hf.register()
    model = _tiny_llama()
    flute.quantize_model(model, bits=3, group_size=32, offsets=True, progress=False)
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    good = load_file(path)
    key = "model.layers.1.self_attn.v_proj."
    cases = [("scales", lambda t: t.index_fill(1, torch.tensor([1]), float("nan")),
              "holds a non-finite value"),
             ("offsets", lambda t: t.index_fill(0, torch.tensor([0]), float("-inf")),
              "holds a non-finite value"),
             ("table", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")),
              "holds a non-finite value"),
             ("table", lambda t: torch.arange(8, dtype=torch.int32), "must be a float tensor"),
             ("qmeta", lambda t: t.float(), "must be an integer tensor"),
             ("qcodes", lambda t: t.to(torch.int16), "must be uint8")]
    for name, edit, words in cases:
        save_file(dict(good, **{key + name: edit(good[key + name]).contiguous()}), path,
                  metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}{name} {words}"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    save_file(good, path, metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")


# -- reproducibility of the calibrated path ---------------------------------------------------------
def _calibrated_state(threads):
    samples = [torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(s))
               for s in range(3)]
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _tiny_llama(seed=5)
        quantize_model_calibrated(model, samples, bits=3, group_size=32, method="gptq",
                                  codebook="learned", progress=False)
    finally:
        torch.set_num_threads(n)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_calibrated_path_is_bitwise_reproducible():
    a, b, c = _calibrated_state(2), _calibrated_state(2), _calibrated_state(1)
    assert sorted(a) == sorted(b) == sorted(c)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k  # independent of the thread count too


# -- the vLLM loader (run in vLLM's venv, .ci/vllm_env.sh) -------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize("name,edit,words", [
    ("scales", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "holds a non-finite value"),
    ("table", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "holds a non-finite value"),
    ("table", lambda t: torch.arange(t.numel()), "must be a float tensor"),
    ("qmeta", lambda t: t.float(), "must be an integer tensor"),
    ("qcodes", lambda t: t.float(), "must be uint8"),
])
def test_vllm_loader_refuses_bad_tensors(monkeypatch, name, edit, words):
    pytest.importorskip("vllm")
    import test_vllm_loader as tv  # its layer builders and checkpoint helpers
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig

    from flute.integrations import vllm as fv
    fv.register()
    from flute.integrations import vllm_method
    vl = dict(linear=linear, parameter=parameter, config=VllmConfig(), method=vllm_method)
    spec = tv.SPECS["qkv"]
    cfg = vl["method"].FluteConfig(bits=4, group_size=64, pre_quantized=True)
    tensors = tv.quantized_tensors(tv.quantized_checkpoint(spec, 4, 64, False))
    tensors["k"][name] = edit(tensors["k"][name])
    layer = tv.make_layer(vl, monkeypatch, spec, cfg, 0, 1)
    with pytest.raises(ValueError, match=rf"m\.self_attn\.qkv_proj\[k\]\.{name} {words}"):
        tv.load(layer, spec, tensors)


def test_perplexity_of_a_model_with_non_finite_outputs_is_an_error():
    from flute.evaluate import perplexity
    model = _tiny_llama()
    flute.quantize_model(model, bits=4, group_size=32, progress=False)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids) > 1
    with torch.no_grad():  # a NaN that got past every check (set by hand)
        model.model.layers[0].mlp.down_proj.scales[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN or Inf"):
        perplexity(model, ids)

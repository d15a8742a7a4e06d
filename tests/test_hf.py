"""Hugging Face transformers integration on a tiny random Llama (CPU, seconds).

Also run against transformers 5.19 by .ci/hf_versions.sh.
"""
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import flute  # noqa: E402
from flute import QuantLinear  # noqa: E402
from flute.linear import GemvLinear  # noqa: E402  (CPU loads: the leftover nn.Linear layers)
from flute.integrations import huggingface as hf  # noqa: E402

assert hf.register()
from flute.integrations.hf_config import FluteConfig  # noqa: E402
from flute.integrations.hf_quantizer import FluteHfQuantizer  # noqa: E402


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def qlinears(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


@pytest.fixture
def fp_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def test_register_is_idempotent_and_uses_transformers_registry():
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                              AUTO_QUANTIZER_MAPPING)
    assert hf.register() and hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["flute"] is FluteConfig
    assert AUTO_QUANTIZER_MAPPING["flute"] is FluteHfQuantizer


def test_config_round_trip_and_validation():
    cfg = FluteConfig(bits=3, group_size=64, codebook="learned", calibration={"tokens": 10})
    d = cfg.to_dict()
    assert d["quant_method"] == "flute" and d["learned_table"] and d["calibration"] == {"tokens": 10}
    again = FluteConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    for bad in (dict(bits=5), dict(group_size=0), dict(codebook="nf5"), dict(method="awq")):
        with pytest.raises(ValueError):
            FluteConfig(**bad)


def test_save_load_sharded_identical_logits(tmp_path, ids):
    model = tiny_llama()
    flute.quantize_model(model, bits=3, group_size=64, progress=False)
    assert isinstance(model.config.quantization_config, FluteConfig)
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "q", max_shard_size="150KB")
    files = os.listdir(tmp_path / "q")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "flute" and qc["bits"] == 3 and qc["group_size"] == 64
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(qlinears(loaded)) == 14 and type(loaded.lm_head) is GemvLinear
    assert torch.equal(logits(loaded, ids), ref)
    # and the loaded model saves again to the same tensors
    loaded.save_pretrained(tmp_path / "q2")
    a = load_file(tmp_path / "q2" / "model.safetensors")
    b = {}
    for f in files:
        if f.endswith(".safetensors"):
            b.update(load_file(tmp_path / "q" / f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_on_load_matches_quantize_model(fp_dir, tmp_path, ids):
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=FluteConfig(bits=4, group_size=64))
    assert len(qlinears(model)) == 14 and type(model.lm_head) is GemvLinear
    ref = tiny_llama()
    flute.quantize_model(ref, bits=4, group_size=64, progress=False)
    out = logits(model, ids)
    assert torch.equal(out, logits(ref, ids))
    model.save_pretrained(tmp_path / "otf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "otf", device_map="cpu")
    assert torch.equal(logits(again, ids), out)


def test_quantize_on_load_options_and_skip(fp_dir, tmp_path, ids):
    cfg = FluteConfig(bits=3, group_size=32, codebook="learned", offsets=True,
                      modules_to_not_convert=["down_proj"])
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg)
    assert type(model.model.layers[0].mlp.down_proj) is GemvLinear
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.offsets is not None and q.bits == 3
    out = logits(model, ids)
    model.save_pretrained(tmp_path / "mixed")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    assert type(again.model.layers[0].mlp.down_proj) is GemvLinear
    assert torch.equal(logits(again, ids), out)


def test_fp16_checkpoint_keeps_dtypes_and_device_map_auto(tmp_path, ids):
    tiny_llama(tie=True).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.float16)
    flute.quantize_model(model, bits=4, group_size=64, progress=False)
    model.save_pretrained(tmp_path / "h")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "h", device_map="auto")
    m = loaded.model.layers[0].mlp.up_proj
    assert m.scales.dtype == torch.float16 and m.table.dtype == torch.float32
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    x = ids[:1]
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_calibrated_model_saves_and_loads(tmp_path, ids):
    from flute.calibrate import quantize_model_calibrated
    model = tiny_llama()
    samples = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    quantize_model_calibrated(model, samples, bits=3, group_size=64, method="gptq",
                              codebook="learned", progress=False)
    qc = model.config.quantization_config
    assert qc.method == "gptq" and qc.act_aware and qc.calibration["tokens"] == 128
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "g")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert loaded.config.quantization_config.method == "gptq"
    assert torch.equal(logits(loaded, ids), ref)


def test_dequantize_gives_plain_linear(tmp_path, ids):
    model = tiny_llama()
    flute.quantize_model(model, bits=4, group_size=64, progress=False)
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    loaded.dequantize()
    assert not qlinears(loaded)
    assert torch.allclose(logits(loaded, ids), ref, atol=1e-4, rtol=1e-4)


# -- errors name the problem --------------------------------------------------------------------
@pytest.fixture
def q_dir(tmp_path):
    model = tiny_llama()
    flute.quantize_model(model, bits=3, group_size=64, progress=False)
    model.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


def _edit(q_dir, fn):
    path = q_dir / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_error_foreign_format_version_in_config(q_dir):
    cfg = json.load(open(q_dir / "config.json"))
    cfg["quantization_config"]["format_version"] = 99
    json.dump(cfg, open(q_dir / "config.json", "w"))
    with pytest.raises(ValueError, match="format version 99"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_error_foreign_format_version_in_tensor(q_dir):
    def bump(sd):
        sd["model.layers.0.self_attn.k_proj.qmeta"][0] = 7
    _edit(q_dir, bump)
    with pytest.raises(ValueError, match=r"k_proj\.qmeta says flute format version 7"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_error_missing_tensor(q_dir):
    _edit(q_dir, lambda sd: sd.pop("model.layers.1.mlp.gate_proj.scales"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.gate_proj\.scales"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_error_mismatched_shape(q_dir):
    def shrink(sd):
        k = "model.layers.0.mlp.up_proj.qcodes"
        sd[k] = sd[k][:100].contiguous()
    _edit(q_dir, shrink)
    with pytest.raises(ValueError, match=r"up_proj\.qcodes has shape \(100, 48\)"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_error_table_of_wrong_size(q_dir):
    def grow(sd):
        sd["model.layers.0.self_attn.o_proj.table"] = torch.linspace(-1, 1, 16)
    _edit(q_dir, grow)
    with pytest.raises(ValueError, match=r"o_proj\.table has 16 entries; a 3-bit table needs 8"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_error_model_shape_differs_from_checkpoint(q_dir):
    cfg = json.load(open(q_dir / "config.json"))
    cfg["intermediate_size"] = 384
    json.dump(cfg, open(q_dir / "config.json", "w"))
    with pytest.raises(ValueError, match=r"gate_proj: the checkpoint holds a 320x128 weight"):
        AutoModelForCausalLM.from_pretrained(q_dir)


def test_on_load_gptq_is_refused_with_a_pointer(fp_dir):
    with pytest.raises(ValueError, match="flute quantize"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=FluteConfig(method="gptq"))


@pytest.mark.cuda
def test_cpu_checkpoint_loads_on_gpu_and_back(q_dir, tmp_path, ids):
    cpu = AutoModelForCausalLM.from_pretrained(q_dir)
    gpu = AutoModelForCausalLM.from_pretrained(q_dir, device_map="cuda")
    assert gpu.model.layers[0].self_attn.q_proj.qweight.is_cuda
    ref = logits(cpu, ids)
    out = logits(gpu, ids.cuda()).cpu()
    assert torch.allclose(out, ref, atol=2e-3, rtol=2e-3)
    gpu.save_pretrained(tmp_path / "from_gpu")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "from_gpu")
    assert torch.equal(logits(back, ids), ref)


def test_cpu_load_decodes_a_bf16_lm_head_through_the_flute_kernel(tmp_path, ids):
    tiny_llama(tie=True).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.bfloat16)
    flute.quantize_model(model, bits=4, group_size=64, progress=False)
    model.save_pretrained(tmp_path / "b")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    head = loaded.lm_head
    assert type(head) is GemvLinear and head.weight.dtype == torch.bfloat16
    assert head.weight is loaded.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        h = loaded.model(ids[:1, :1]).last_hidden_state  # one decoding row
        y = head(h)
        ref = nn.functional.linear(h, head.weight)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    if flute.ops.HAS_CPU_KERNEL:
        assert torch.equal(y, torch.ops.flute.bf16_gemv(h, head.weight))

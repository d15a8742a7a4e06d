import copy
import time

import pytest
import torch
from torch import nn

import flute
import flute.evaluate
import flute.model
from flute import QuantLinear, quantize_model
from flute.modules import linear_layers

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_replaces_linears_and_keeps_logits_close():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    names = [n for n, _ in linear_layers(model)]
    assert len(names) == 14 and "lm_head" not in names
    quantize_model(model, bits=4, group_size=32, progress=False)
    for n in names:
        assert isinstance(model.get_submodule(n), QuantLinear)
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.1
    cfg = model.config.quantization_config
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    assert cfg["quant_method"] == "flute" and cfg["bits"] == 4 and cfg["group_size"] == 32


def tied_quantized_llama(**kwargs):
    """A tiny Llama with a tied embedding / lm_head, quantized to 4 bits, group 32 (kwargs: more
    quantize_model options)."""
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_model(model, bits=4, group_size=32, progress=False, **kwargs)
    return model


def test_cast_unquantized_moves_only_the_float_leftovers():
    model = tied_quantized_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    q = model.model.layers[0].self_attn.q_proj
    before = {k: (v.dtype, v.clone()) for k, v in q.state_dict().items()}
    assert flute.model.cast_unquantized(model, torch.bfloat16) is model
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for k, v in q.state_dict().items():  # the quantized layer: untouched
        assert v.dtype == before[k][0] and torch.equal(v, before[k][1]), k
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        flute.model.cast_unquantized(model, torch.int8)


def test_cast_unquantized_min_elements_keeps_the_small_ones_and_float32_activations():
    model = tied_quantized_llama()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    big = model.model.embed_tokens.weight.numel()
    flute.model.cast_unquantized(model, torch.bfloat16, min_elements=big)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.norm.weight.dtype == torch.float32  # fewer elements: kept
    flute.model.gemv_unquantized(model)  # the bf16 lm_head takes the float32 activations
    with torch.no_grad():
        out = model(ids).logits  # 7 rows
        one = model(ids[:, :1]).logits  # one row
    assert out.dtype == torch.float32 and one.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.03
    assert ((one[0, 0] - ref[0, 0]).norm() / ref[0, 0].norm()).item() < 0.03
    with pytest.raises(ValueError, match="min_elements"):
        flute.model.cast_unquantized(model, torch.bfloat16, min_elements=-1)


def test_gemv_unquantized_swaps_the_plain_linears_left(monkeypatch):
    monkeypatch.setattr(flute.linear, "DENSE_MAX_ROWS", 4 if flute.ops.HAS_CPU_KERNEL else 0)
    model = tied_quantized_llama(skip=("lm_head", "*.mlp.down_proj"))
    flute.model.cast_unquantized(model, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_many = model(ids).logits
        ref_one = model(ids[:, :1]).logits
    keys = set(model.state_dict())
    assert flute.model.gemv_unquantized(model) == 3  # lm_head and the two down_proj
    assert type(model.lm_head) is flute.linear.GemvLinear
    assert type(model.model.layers[1].mlp.down_proj) is flute.linear.GemvLinear
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_many)  # 9 rows: the same nn.Linear path
        one = model(ids[:, :1]).logits  # one row: flute::bf16_gemv (or torch.mv), the sums in another order
    assert ((one.float() - ref_one.float()).norm() / ref_one.float().norm()).item() < 0.02
    assert flute.model.gemv_unquantized(model) == 0  # nothing plain left


def test_gemv_unquantized_moves_large_weights_into_huge_pages_and_keeps_them_tied(monkeypatch):
    monkeypatch.setattr(flute.huge_pages, "WEIGHT_MIN_BYTES", 1)  # the tiny model's weights count as large
    model = tied_quantized_llama(skip=("lm_head",))
    flute.model.cast_unquantized(model, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    before = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        flute.model.gemv_unquantized(model)
        ref = model(ids).logits
    w = model.lm_head.weight
    assert w is model.model.embed_tokens.weight  # the same Parameter: still tied
    assert torch.equal(w, before) and w.data_ptr() % flute.huge_pages.HUGE_PAGE_BYTES == 0
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()  # its own memory, exactly
    assert w.data_ptr() != before.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_skip_patterns():
    model = tiny_llama()
    quantize_model(model, bits=3, group_size=32, skip=("lm_head", "*.mlp.down_proj", "k_proj"),
                   progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.k_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), progress=False)


smollm2 = pytest.importorskip("flute.smollm2")


@pytest.fixture(scope="module")
def smol():
    try:
        model, tok = smollm2.load_smollm2(torch.float32)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = tok(flute.evaluate.builtin_text(), return_tensors="pt").input_ids
    return model, ids, flute.evaluate.perplexity(model, ids)


# Bounds on the perplexity increase over the unquantized model, measured on the built-in text
# (README, "Quality"), with margin: 4-bit NF absmax measured +21.2%, 3-bit NF with MSE scales +144%.
BOUNDS = {4: ("absmax", 0.30), 3: ("mse", 1.80)}


@pytest.mark.slow
def test_smollm2_q4_1_is_reproduced_by_asymmetric_int4_g32(smol):
    """The GGUF weights sit on an asymmetric 4-bit grid (blocks of 32): min/max with offsets is exact."""
    model, ids, base = smol
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32, codebook="int", offsets=True,
                       progress=False)
    assert abs(flute.evaluate.perplexity(q, ids) / base - 1) < 0.001


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_smollm2_perplexity_bounds(smol, bits):
    model, ids, base = smol
    method, bound = BOUNDS[bits]
    t0 = time.perf_counter()
    q = quantize_model(copy.deepcopy(model), bits=bits, group_size=64, scale_method=method,
                       progress=False)
    seconds = time.perf_counter() - t0
    ppl = flute.evaluate.perplexity(q, ids)
    print(f"SmolLM2 {bits}-bit g64 {method}: ppl {ppl:.2f} vs {base:.2f}, quantized in {seconds:.1f} s")
    assert ppl / base - 1 < bound
    assert ppl > base  # a quantized model that beats the original on this text would be suspect
    if bits == 3:
        # 3-bit g64 with scale search measured 20.5 s on the idle AVX2 VM of sessions 3-13, 70.7 s
        # on the idle AVX-512 VM of sessions 14-16 and 120.4 s in a CI run there; the bound leaves
        # room for a loaded CI machine while still catching a several-fold regression.
        assert seconds < 300


def test_decode_speeds_times_the_models_in_turn():
    """Models are decoded round-robin (one decode of each per round, after one warm-up each), and
    each model's rate is its own tokens over its own time."""
    calls = []

    class Fake(torch.nn.Module):
        def __init__(self, name, tokens, delay):
            super().__init__()
            self.name, self.tokens, self.delay = name, tokens, delay
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, max_new_tokens, **kw):
            calls.append((self.name, max_new_tokens))
            time.sleep(self.delay)
            n = self.tokens if max_new_tokens > 2 else 2
            return torch.cat([input_ids, torch.full((1, n), 7)], dim=1)

    class Tok:
        eos_token_id = 0

        def __call__(self, text, return_tensors):
            return transformers.BatchEncoding({"input_ids": torch.tensor([[1, 2, 3]])})

        def decode(self, ids, skip_special_tokens):
            return f"{len(ids)} tokens"

    out = flute.evaluate.decode_speeds({"a": Fake("a", 8, 0.05), "b": Fake("b", 8, 0.2)}, Tok(),
                                       "prompt", new_tokens=8, rounds=3)
    assert calls == [("a", 2), ("b", 2)] + [("a", 8), ("b", 8)] * 3
    assert out["a"][1] == out["b"][1] == "8 tokens"
    assert 2.5 < out["a"][0] / out["b"][0] < 4.5   # 8 / 0.05 s against 8 / 0.2 s
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        flute.evaluate.decode_speeds({}, Tok(), "p", rounds=0)

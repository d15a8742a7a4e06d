"""The vLLM plugin's loading path with vLLM's real linear layers at simulated tensor-parallel ranks.

Each test builds ``ColumnParallelLinear`` / ``MergedColumnParallelLinear`` / ``QKVParallelLinear``
/ ``RowParallelLinear`` once per rank of a TP size (1, 2, 4) by patching vLLM's TP rank/size
getters (in the test only; the plugin never patches vLLM), feeds the checkpoint tensors through the
layers' own weight loaders, and checks that (a) the shards put back together are the unsharded
tensors and (b) the sharded outputs, concatenated or summed, equal the full layer's output.

Tests marked ``vllm`` skip when vLLM is not importable (run them in the vLLM venv, see
``.ci/vllm_env.sh``); the rest check the vLLM-free helpers.
"""
import importlib
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

import flute
from flute.format import dequantize_codes
from flute.integrations import vllm as fv
from flute.integrations import vllm_settings as vs

TP_SIZES = (1, 2, 4)


# --------------------------------------------------------------------------------------------------
# vLLM-free checks
# --------------------------------------------------------------------------------------------------
def test_import_does_not_import_vllm():
    code = ("import sys, flute.integrations.vllm as m; "
            "assert 'vllm' not in sys.modules, 'imported vllm'; "
            "assert callable(m.register)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_defaults_and_errors():
    s = vs.parse_settings(None, pre_quantized=False)
    assert (s["bits"], s["group_size"], s["codebook"]) == (4, 64, "nf")
    s = vs.settings_from_json('{"bits": 3, "group_size": 128, "codebook": "int"}')
    assert (s["bits"], s["group_size"], s["codebook"], s["pre_quantized"]) == (3, 128, "int", False)
    with pytest.raises(ValueError, match="quant_method"):
        vs.parse_settings({"quant_method": "gptq"}, pre_quantized=True)
    with pytest.raises(ValueError, match="format version"):
        vs.parse_settings({"quant_method": "flute", "format_version": 99}, pre_quantized=True)
    with pytest.raises(ValueError, match="bits"):
        vs.parse_settings({"bits": 5}, pre_quantized=False)
    with pytest.raises(ValueError, match="unknown"):
        vs.settings_from_json('{"bitz": 3}')


def test_partition_checks():
    vs.check_input_partition("l", 512, 512, 3, 64)      # not split
    vs.check_input_partition("l", 512, 128, 3, 64)      # TP 4
    vs.check_input_partition("l", 512, 128, 3, -1)
    with pytest.raises(ValueError, match=r"not a multiple of the group size 64.*\[1, 3\]"):
        vs.check_input_partition("l", 192, 48, 4, 64)
    with pytest.raises(ValueError, match="whole number of bytes"):
        vs.check_input_partition("l", 36, 18, 3, -1)
    assert vs.valid_row_parallel_sizes(576, 4, 64) == [1, 3, 9]
    assert vs.valid_row_parallel_sizes(4096, 3, 128) == [1, 2, 4, 8, 16]


def test_skip_rules():
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert vs.is_skipped("model.layers.0.mlp.down_proj", ["*.mlp.down_proj"], mapping)
    assert not vs.is_skipped("model.layers.0.mlp.down_proj", ["lm_head"], mapping)
    assert vs.is_skipped("model.layers.1.mlp.gate_up_proj", ["gate_proj", "up_proj"], mapping)
    with pytest.raises(ValueError, match="all quantized or all unquantized"):
        vs.is_skipped("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.q_proj"],
                      mapping)


# --------------------------------------------------------------------------------------------------
# vLLM layers at simulated TP ranks
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vl():
    """vLLM's modules, the registered plugin and a default VllmConfig (skip without vLLM)."""
    pytest.importorskip("vllm")
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig

    fv.register()
    from flute.integrations import vllm_method
    return dict(linear=linear, parameter=parameter, config=VllmConfig(), method=vllm_method)


@dataclass
class Spec:
    """A layer kind and its logical matrices (name, rows) over ``in_features`` columns."""
    kind: str
    in_features: int
    outputs: list
    bias: bool
    extra: dict = field(default_factory=dict)


SPECS = {
    "column": Spec("column", 256, [("proj", 192)], True),
    "merged": Spec("merged", 256, [(0, 128), (1, 128)], False),
    "qkv": Spec("qkv", 256, [("q", 256), ("k", 128), ("v", 128)], True,
                dict(head_size=32, heads=8, kv_heads=4)),
    "qkv_replicated_kv": Spec("qkv", 256, [("q", 256), ("k", 64), ("v", 64)], False,
                              dict(head_size=32, heads=8, kv_heads=2)),
    "row": Spec("row", 512, [("proj", 128)], True),
}


def make_layer(vl, monkeypatch, spec: Spec, quant_config, rank: int, tp: int,
               dtype=torch.float32):
    L = vl["linear"]
    for mod in (vl["linear"], vl["parameter"]):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: tp)
    from vllm.config import set_current_vllm_config
    kw = dict(bias=spec.bias, quant_config=quant_config, params_dtype=dtype)
    with set_current_vllm_config(vl["config"]):
        if spec.kind == "column":
            return L.ColumnParallelLinear(spec.in_features, spec.outputs[0][1], prefix="m.up",
                                          **kw)
        if spec.kind == "merged":
            return L.MergedColumnParallelLinear(spec.in_features, [n for _, n in spec.outputs],
                                                prefix="m.mlp.gate_up_proj", **kw)
        if spec.kind == "qkv":
            e = spec.extra
            return L.QKVParallelLinear(spec.in_features, e["head_size"], e["heads"],
                                       e["kv_heads"], prefix="m.self_attn.qkv_proj", **kw)
        return L.RowParallelLinear(spec.in_features, spec.outputs[0][1], prefix="m.down_proj",
                                   **kw)


def quantized_checkpoint(spec: Spec, bits, group_size, offsets, seed=0):
    """{shard id: (QuantizedWeight, bias or None)} with a learned (hence distinct) table each."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sid, n in spec.outputs:
        w = torch.randn(n, spec.in_features, generator=g) * 0.05
        qw = flute.quantize_weight(w, bits, group_size, offsets=offsets, learned_table=True)
        b = torch.randn(n, generator=g) * 0.1 if spec.bias else None
        out[sid] = (qw, b)
    return out


def dequant64(qw):
    """The weight of a QuantizedWeight computed in float64 (as the op does for float64 inputs)."""
    return dequantize_codes(qw.codes(), qw.scales, qw.offsets, qw.table, qw.group_size,
                            torch.float64)


def float_checkpoint(spec: Spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {sid: (torch.randn(n, spec.in_features, generator=g) * 0.05,
                  torch.randn(n, generator=g) * 0.1 if spec.bias else None)
            for sid, n in spec.outputs}


def shard_arg(spec: Spec, sid):
    return () if spec.kind in ("column", "row") else (sid,)


def load(layer, spec: Spec, tensors_by_shard: dict):
    """Feed ``{shard id: {param name: tensor}}`` through the layer's own weight loaders."""
    params = dict(layer.named_parameters())
    for sid, tensors in tensors_by_shard.items():
        for name, t in tensors.items():
            p = params[name]
            p.weight_loader(p, t, *shard_arg(spec, sid))


def quantized_tensors(ckpt):
    out = {}
    for sid, (qw, b) in ckpt.items():
        t = dict(qw.state_dict())
        if b is not None:
            t["bias"] = b
        out[sid] = t
    return out


def reference_output(spec, weights_and_biases, x):
    """x @ W_full.T + b_full in float64, W_full the logical matrices stacked along N."""
    w = torch.cat([wb[0] for wb in weights_and_biases.values()]).double()
    y = x.double() @ w.t()
    if spec.bias:
        y = y + torch.cat([wb[1] for wb in weights_and_biases.values()]).double()
    return y


def local_rows(spec: Spec, tp: int):
    """Rows per rank of each logical matrix, and how many ranks share each kv head."""
    rows, replicas = [], []
    for sid, n in spec.outputs:
        r = 1
        if spec.kind == "qkv" and sid in ("k", "v") and spec.extra["kv_heads"] < tp:
            r = tp // spec.extra["kv_heads"]
        rows.append(n * r // tp)
        replicas.append(r)
    return rows, replicas


def assemble_columns(spec, tp, per_rank, dim=0):
    """Undo column sharding: per_rank[r] is rank r's fused tensor along ``dim`` (rows)."""
    rows, replicas = local_rows(spec, tp)
    logical = []
    for j, (n_local, rep) in enumerate(zip(rows, replicas)):
        start = sum(rows[:j])
        pieces = [per_rank[r].narrow(dim, start, n_local) for r in range(0, tp, rep)]
        for r in range(tp):  # replicated kv heads: every rank of a group holds the same rows
            assert torch.equal(per_rank[r].narrow(dim, start, n_local), pieces[r // rep])
        logical.append(torch.cat(pieces, dim))
    return torch.cat(logical, dim)


def snapshot(layer, names):
    return {n: p.detach().clone() for n, p in layer.named_parameters() if n in names}


def run_ranks(vl, monkeypatch, spec, cfg, tp, tensors, x):
    """Build, load and process the layer on every rank; return (loaded tensors, outputs)."""
    loaded, outs = [], []
    for rank in range(tp):
        layer = make_layer(vl, monkeypatch, spec, cfg, rank, tp)
        load(layer, spec, tensors)
        loaded.append(snapshot(layer, {"qcodes", "scales", "offsets", "table", "qmeta", "weight",
                                       "bias"}))
        layer.quant_method.process_weights_after_loading(layer)
        if spec.kind == "row":
            k_local = spec.in_features // tp
            xr = x[:, rank * k_local:(rank + 1) * k_local]
            bias = layer.bias if (layer.bias is not None and rank == 0) else None
            outs.append(layer.quant_method.apply(layer, xr, bias))
        else:
            outs.append(layer.quant_method.apply(layer, x, layer.bias))
    return loaded, outs


def combine_outputs(spec, tp, outs):
    if spec.kind == "row":
        return torch.stack(outs).sum(0)
    return assemble_columns(spec, tp, outs, dim=1)


QUANT_CASES = [  # (spec, bits, group size, offsets)
    ("column", 4, 64, False),
    ("column", 3, -1, True),
    ("merged", 4, 32, False),
    ("merged", 2, 64, True),
    ("qkv", 4, 64, False),
    ("qkv", 3, 128, False),
    ("qkv_replicated_kv", 4, 64, True),
    ("row", 4, 64, False),
    ("row", 3, 128, True),
    ("row", 4, -1, False),
    ("row", 2, 32, False),
]


@pytest.mark.vllm
@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"{c[0]}-w{c[1]}g{c[2]}"
                         + ("-off" if c[3] else ""))
def test_prequantized_shards(vl, monkeypatch, case, tp):
    name, bits, group_size, offsets = case
    spec = SPECS[name]
    ckpt = quantized_checkpoint(spec, bits, group_size, offsets)
    cfg = vl["method"].FluteConfig.from_config(
        {"quant_method": "flute", "format_version": flute.FORMAT_VERSION, "bits": bits,
         "group_size": group_size, "offsets": offsets, "learned_table": True})
    x = torch.randn(5, spec.in_features, generator=torch.Generator().manual_seed(7)).double()
    loaded, outs = run_ranks(vl, monkeypatch, spec, cfg, tp, quantized_tensors(ckpt), x)

    # (a) the shards assembled back are the checkpoint's tensors
    full = {k: torch.cat([qw.state_dict()[k] for qw, _ in ckpt.values()])
            for k in ("qcodes", "scales") + (("offsets",) if offsets else ())}
    for key, want in full.items():
        per_rank = [d[key] for d in loaded]
        if spec.kind == "row":
            got = (per_rank[0] if key != "qcodes" and group_size == -1
                   else torch.cat(per_rank, dim=1))
            if group_size == -1 and key != "qcodes":
                assert all(torch.equal(p, per_rank[0]) for p in per_rank)
        else:
            got = assemble_columns(spec, tp, per_rank)
        assert torch.equal(got, want), key
    tables = torch.stack([qw.table for qw, _ in ckpt.values()])
    qmeta = torch.stack([qw.qmeta() for qw, _ in ckpt.values()])
    for d in loaded:  # tables and qmeta: one row per logical matrix, on every rank
        assert torch.equal(d["table"], tables)
        assert torch.equal(d["qmeta"], qmeta)
    if spec.kind in ("merged", "qkv"):
        assert len(set(map(tuple, tables.tolist()))) == len(spec.outputs)  # really distinct

    # (b) outputs: concatenated (column) / summed (row) equal the full layer's
    dequant = {sid: (dequant64(qw), b) for sid, (qw, b) in ckpt.items()}
    want = reference_output(spec, dequant, x)
    got = combine_outputs(spec, tp, outs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    # and the TP=1 layer computes what flute's own QuantLinear computes
    if tp == 1:
        ql = torch.cat([flute.QuantLinear.from_quantized(qw, b)(x) for qw, b in ckpt.values()], -1)
        torch.testing.assert_close(outs[0], ql, rtol=1e-12, atol=1e-12)


ONLINE_CASES = [("qkv", 4, 64), ("merged", 3, 64), ("row", 4, 64), ("row", 2, -1),
                ("column", 4, 64)]


@pytest.mark.vllm
@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", ONLINE_CASES, ids=lambda c: f"{c[0]}-w{c[1]}g{c[2]}")
def test_quantize_at_load(vl, monkeypatch, case, tp):
    """Unquantized checkpoint + --quantization flute: each rank quantizes its float shard."""
    name, bits, group_size = case
    spec = SPECS[name]
    ckpt = float_checkpoint(spec)
    cfg = vl["method"].FluteConfig.from_config_dict_json(
        f'{{"bits": {bits}, "group_size": {group_size}}}')
    assert not cfg.pre_quantized
    tensors = {sid: {"weight": w, **({"bias": b} if b is not None else {})}
               for sid, (w, b) in ckpt.items()}
    x = torch.randn(3, spec.in_features, generator=torch.Generator().manual_seed(3)).double()
    loaded, outs = run_ranks(vl, monkeypatch, spec, cfg, tp, tensors, x)
    want_w = torch.cat([w for w, _ in ckpt.values()])
    got_w = (torch.cat([d["weight"] for d in loaded], 1) if spec.kind == "row"
             else assemble_columns(spec, tp, [d["weight"] for d in loaded]))
    assert torch.equal(got_w, want_w)
    got = combine_outputs(spec, tp, outs)
    if group_size == -1 and spec.kind == "row" and tp > 1:
        # one scale per row and rank: each rank quantizes its own K slice (a valid, different
        # quantization from the unsplit one); the sum over ranks is exactly that
        (w, b), = ckpt.values()
        kl = spec.in_features // tp
        want = sum(x[:, r * kl:(r + 1) * kl] @ dequant64(
            flute.quantize_weight(w[:, r * kl:(r + 1) * kl], bits, -1)).t() for r in range(tp))
        torch.testing.assert_close(got, want + b.double(), rtol=1e-9, atol=1e-9)
        return
    # quantizing the full logical matrices gives the same weights (rows/groups are independent)
    dequant = {sid: (dequant64(flute.quantize_weight(w, bits, group_size)), b)
               for sid, (w, b) in ckpt.items()}
    torch.testing.assert_close(got, reference_output(spec, dequant, x), rtol=1e-9, atol=1e-9)


@pytest.mark.vllm
def test_equal_tables_share_one_kernel_call(vl, monkeypatch):
    spec = SPECS["qkv"]
    ckpt = {}
    g = torch.Generator().manual_seed(1)
    for sid, n in spec.outputs:
        ckpt[sid] = (flute.quantize_weight(torch.randn(n, 256, generator=g), 4, 64), None)
    cfg = vl["method"].FluteConfig.from_config({"quant_method": "flute", "bits": 4,
                                                "group_size": 64})
    spec_nb = Spec("qkv", 256, spec.outputs, False, spec.extra)
    layer = make_layer(vl, monkeypatch, spec_nb, cfg, 0, 1)
    load(layer, spec_nb, quantized_tensors(ckpt))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.flute_parts == [512]  # one NF table for q, k and v: one call
    layer.quant_method.process_weights_after_loading(layer)  # a second call is a no-op
    assert not hasattr(layer, "qcodes") and not hasattr(layer, "table")
    w = layer.quant_method.dequantize_weight(layer)
    torch.testing.assert_close(w, torch.cat([qw.dequantize() for qw, _ in ckpt.values()]))


@pytest.mark.vllm
@pytest.mark.parametrize("bits,group_size,in_features,tp,match", [
    (4, 64, 192, 4, "not a multiple of the group size 64"),
    (3, -1, 36, 2, "whole number of bytes"),
    (4, 128, 384, 2, "not a multiple of the group size 128"),
])
def test_k_shard_errors(vl, monkeypatch, bits, group_size, in_features, tp, match):
    cfg = vl["method"].FluteConfig.from_config({"quant_method": "flute", "bits": bits,
                                                "group_size": group_size})
    spec = Spec("row", in_features, [("proj", 64)], False)
    with pytest.raises(ValueError, match=match):
        make_layer(vl, monkeypatch, spec, cfg, 0, tp)
    make_layer(vl, monkeypatch, spec, cfg, 0, 1)  # unsplit is fine


@pytest.mark.vllm
def test_missing_shard_is_reported(vl, monkeypatch):
    spec = Spec("qkv", 256, SPECS["qkv"].outputs, False, SPECS["qkv"].extra)
    ckpt = quantized_checkpoint(spec, 4, 64, False)
    del ckpt["v"]
    cfg = vl["method"].FluteConfig.from_config({"quant_method": "flute", "bits": 4,
                                                "group_size": 64})
    layer = make_layer(vl, monkeypatch, spec, cfg, 0, 1)
    load(layer, spec, quantized_tensors(ckpt))
    with pytest.raises(ValueError, match="logical matrix 2 was not found"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.vllm
def test_checkpoint_settings_must_match(vl, monkeypatch):
    spec = SPECS["column"]
    ckpt = quantized_checkpoint(spec, 4, 64, False)
    tensors = quantized_tensors(ckpt)
    meta = tensors["proj"]["qmeta"].clone()
    meta[3] = 999  # in_features recorded in the checkpoint differs from the model's
    tensors["proj"]["qmeta"] = meta
    cfg = vl["method"].FluteConfig.from_config({"quant_method": "flute", "bits": 4,
                                                "group_size": 64})
    layer = make_layer(vl, monkeypatch, spec, cfg, 0, 1)
    load(layer, spec, tensors)
    with pytest.raises(ValueError, match="in_features=999"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.vllm
def test_skipped_modules_stay_unquantized(vl, monkeypatch):
    m = vl["method"]
    cfg = m.FluteConfig.from_config({"quant_method": "flute", "bits": 4, "group_size": 64,
                                     "modules_to_not_convert": ["lm_head", "*.down_proj"]})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    row = make_layer(vl, monkeypatch, SPECS["row"], cfg, 0, 1)
    assert type(row.quant_method).__name__ == "UnquantizedLinearMethod"
    qkv = make_layer(vl, monkeypatch, SPECS["qkv"], cfg, 0, 1)
    assert isinstance(qkv.quant_method, m.FluteLinearMethod)


@pytest.mark.vllm
def test_config_interface(vl):
    m = vl["method"]
    from vllm.model_executor.layers.quantization import get_quantization_config
    fv.register()
    fv.register()  # idempotent
    assert get_quantization_config("flute") is m.FluteConfig
    cfg = m.FluteConfig()
    assert (cfg.bits, cfg.group_size, cfg.pre_quantized) == (4, 64, False)
    assert cfg.get_name() == "flute"
    assert m.FluteConfig.get_min_capability() == 80
    assert cfg.get_supported_act_dtypes() == [torch.float16, torch.bfloat16]
    assert m.FluteConfig.get_config_filenames() == []
    assert "FluteLinearMethod" in vl["linear"].WEIGHT_LOADER_V2_SUPPORTED
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = [e for e in eps if e.name == "flute"]
    assert ep and ep[0].value == "flute.integrations.vllm:register"
    assert ep[0].load() is fv.register


@pytest.mark.vllm
def test_apply_traces_with_torch_compile(vl, monkeypatch):
    """apply() is traceable in one graph (the op has a fake implementation), as vLLM compiles it."""
    spec = SPECS["merged"]
    ckpt = quantized_checkpoint(spec, 3, 64, True)
    cfg = vl["method"].FluteConfig.from_config({"quant_method": "flute", "bits": 3,
                                                "group_size": 64, "offsets": True})
    layer = make_layer(vl, monkeypatch, spec, cfg, 1, 2, dtype=torch.bfloat16)
    load(layer, spec, quantized_tensors(ckpt))
    layer.quant_method.process_weights_after_loading(layer)
    assert len(layer.flute_parts) == 2  # learned tables differ: one call per logical matrix
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    eager = layer.quant_method.apply(layer, x)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer.quant_method.apply(layer, t), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x), eager)
    assert compiled(x[:2]).shape == (2, 128)


@pytest.mark.vllm
def test_lm_head_decoding_steps_through_flute_gemv(vl, monkeypatch):
    """The lm_head stays unquantized (vLLM's own embedding method underneath: loading, tying, its
    CPU GEMM set-up), but a decoding step's bf16 product on the CPU runs flute::bf16_gemv; larger
    batches and the embedding keep vLLM's path."""
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe
    m = vl["method"]
    monkeypatch.setattr(vpe, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vpe, "get_tensor_model_parallel_world_size", lambda: 1)
    cfg = m.FluteConfig.from_config({"quant_method": "flute", "bits": 4, "group_size": 64})
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(vl["config"]):
        head = vpe.ParallelLMHead(1000, 192, params_dtype=torch.bfloat16, quant_config=cfg,
                                  prefix="lm_head")
        emb = vpe.VocabParallelEmbedding(1000, 192, params_dtype=torch.bfloat16,
                                         quant_config=cfg, prefix="model.embed_tokens")
    assert isinstance(head.quant_method, m.FluteLMHeadMethod)
    assert isinstance(head.quant_method, vpe.UnquantizedEmbeddingMethod)  # head_dtype checks pass
    assert type(emb.quant_method) is vpe.UnquantizedEmbeddingMethod
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g).to(torch.bfloat16))
    head.quant_method.process_weights_after_loading(head)
    base = vpe.UnquantizedEmbeddingMethod()
    w = head.weight
    x1 = torch.randn(1, 192, generator=g).to(torch.bfloat16)
    y1 = head.quant_method.apply(head, x1)
    ref = (x1.double() @ w.double().T)
    assert y1.dtype == torch.bfloat16 and y1.shape == (1, w.shape[0])
    torch.testing.assert_close(y1.double(), ref, rtol=1e-2, atol=1e-2)
    if flute.ops.HAS_CPU_KERNEL:
        assert torch.equal(y1, torch.ops.flute.bf16_gemv(x1, w))  # the kernel's own bits
    many = torch.randn(40, 192, generator=g).to(torch.bfloat16)
    assert torch.equal(head.quant_method.apply(head, many), base.apply(head, many))
    bias = torch.randn(w.shape[0], generator=g).to(torch.bfloat16)
    torch.testing.assert_close(head.quant_method.apply(head, x1, bias).double(),
                               (y1 + bias).double())

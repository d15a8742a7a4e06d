"""Hugging Face transformers (5.x) integration: quant method ``"flute"``.

:func:`register` adds :class:`FluteConfig` and :class:`FluteHfQuantizer` to transformers with its
own ``register_quantization_config`` / ``register_quantizer`` (no patching). ``import flute`` calls
it; it is idempotent and returns False when transformers is not installed. Then:

- ``flute.quantize_model(model, bits=3, group_size=64)`` (or
  :func:`flute.calibrate.quantize_model_calibrated`) on a transformers model, then
  ``model.save_pretrained(dir)``, writes ``quantization_config`` (``quant_method: "flute"``) into
  ``config.json`` and the canonical tensors (``qcodes``, ``scales``, ``offsets``, ``table``,
  ``qmeta``) into the safetensors files; ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds
  the same model on any device (``device_map`` works; CPU-made checkpoints load on a GPU and back).
- ``from_pretrained(fp_dir, quantization_config=FluteConfig(bits=4, group_size=64))`` quantizes
  while loading, one weight at a time, without data.

Loading validates the checkpoint before any weight is read (format version, missing tensors,
shapes, table size) and names the module and tensor at fault.
"""
from __future__ import annotations

import importlib.util
import json
import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

QUANT_METHOD = "flute"
_CODEBOOKS = ("nf", "int", "fp4", "ternary", "learned", "custom")
_METHODS = ("rtn", "gptq")
_TENSORS = ("qcodes", "scales", "table", "qmeta")  # plus optional offsets

_classes: Dict[str, Any] = {}


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def register() -> bool:
    """Register the ``flute`` quant method with transformers; True when it is (now or before)."""
    if not transformers_available():
        return False
    _define()
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                              AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                              register_quantizer)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not _classes["FluteConfig"]:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reload
        register_quantization_config(QUANT_METHOD)(_classes["FluteConfig"])
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not _classes["FluteHfQuantizer"]:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(_classes["FluteHfQuantizer"])
    return True


def __getattr__(name):  # FluteConfig / FluteHfQuantizer, built on first use
    if name in ("FluteConfig", "FluteHfQuantizer"):
        if not transformers_available():
            raise ImportError(f"flute.integrations.huggingface.{name} needs transformers>=5.19 "
                              "(pip install 'flute-lut[hf]')")
        register()
        return _classes[name]
    raise AttributeError(name)


def attach_config(model: nn.Module, settings: dict) -> bool:
    """Record ``settings`` on a transformers model as its FluteConfig and attach a pre-quantized
    FluteHfQuantizer, so that ``save_pretrained`` works; False if this is not possible."""
    if not register() or not hasattr(getattr(model, "config", None), "to_dict"):
        return False
    cfg = _classes["FluteConfig"].from_dict(dict(settings))
    model.config.quantization_config = cfg
    model.hf_quantizer = _classes["FluteHfQuantizer"](cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if hasattr(model.config, "_is_quantized"):
        model.config._is_quantized = True
    return True


# --------------------------------------------------------------------------------------------
# checkpoint inspection (safetensors headers only; no weight is read)
# --------------------------------------------------------------------------------------------
def _checkpoint_index(files) -> Optional[Dict[str, tuple]]:
    """``{key: (dtype string, shape, file)}`` from safetensors headers, or None if unavailable."""
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    from safetensors import safe_open
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                index[key] = (sl.get_dtype(), tuple(sl.get_shape()), str(f))
    return index


def _read_tensor(entry, key) -> torch.Tensor:
    from safetensors import safe_open
    with torch.device("cpu"), safe_open(entry[2], framework="pt", device="cpu") as fh:
        return fh.get_tensor(key)


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64}


def _define() -> None:
    """Build the two classes (they subclass transformers types, so they are defined lazily)."""
    if _classes:
        return
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from flute.codebooks import check_bits
    from flute.format import (FORMAT_VERSION, QuantizedWeight, check_group_size, num_groups,
                              packed_row_bytes, parse_qmeta)
    from flute.linear import QuantLinear
    from flute.model import _matches

    class FluteConfig(QuantizationConfigMixin):
        """Quantization config of the ``flute`` method (lookup-table weights, group-wise scales).

        Args:
            bits: 2, 3 or 4.
            group_size: columns per scale (32, 64, 128, ...; -1 = one group per row).
            codebook: ``"nf"``, ``"int"``, ``"fp4"``, ``"ternary"`` or ``"learned"`` (a table
                fitted to each matrix); what a checkpoint holds is in its ``table`` tensors.
            scale_method: ``"absmax"``, ``"mse"`` or ``"absmean"`` (None: the codebook's default).
            offsets: asymmetric groups (a stored offset per group).
            learned_table: fit one table per matrix (``codebook="learned"`` implies it).
            method: how the checkpoint was made: ``"rtn"`` or ``"gptq"`` (informational;
                quantize-on-load is always data-free round to nearest).
            modules_to_not_convert: module names or patterns kept in full precision (``lm_head``
                and tied/output embeddings are always kept).
            format_version: the canonical format version of the checkpoint.
        Unknown keys (e.g. ``calibration``, ``quantized_modules``) are kept as attributes.
        """

        def __init__(self, bits: int = 4, group_size: int = 64, codebook: str = "nf",
                     scale_method: Optional[str] = None, offsets: bool = False,
                     learned_table: bool = False, method: str = "rtn",
                     modules_to_not_convert: Optional[List[str]] = None,
                     format_version: int = FORMAT_VERSION, **kwargs):
            self.quant_method = QUANT_METHOD
            self.bits, self.group_size = bits, group_size
            self.codebook, self.scale_method = codebook, scale_method
            self.offsets, self.learned_table, self.method = bool(offsets), bool(learned_table), method
            self.modules_to_not_convert = (None if modules_to_not_convert is None
                                           else list(modules_to_not_convert))
            self.format_version = format_version
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)
            self.post_init()

        def post_init(self):
            check_bits(self.bits)
            check_group_size(self.group_size)
            if self.codebook not in _CODEBOOKS:
                raise ValueError(f"FluteConfig: codebook must be one of {_CODEBOOKS}, got "
                                 f"{self.codebook!r}")
            if self.method not in _METHODS:
                raise ValueError(f"FluteConfig: method must be one of {_METHODS}, got {self.method!r}")
            if self.scale_method not in (None, "absmax", "mse", "absmean"):
                raise ValueError(f"FluteConfig: unknown scale_method {self.scale_method!r}")
            if self.codebook == "learned":
                self.learned_table = True

        def to_dict(self) -> Dict[str, Any]:
            d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
            d["quant_method"] = QUANT_METHOD
            return json.loads(json.dumps(d, default=str))

        def quantize_kwargs(self) -> dict:
            codebook = "nf" if self.codebook in ("learned", "custom") else self.codebook
            return dict(codebook=codebook, scale_method=self.scale_method, offsets=self.offsets,
                        learned_table=self.learned_table)

    class FluteQuantize(ConversionOps):
        """Quantize-on-load op: one float ``weight`` in, its ``nn.Linear`` replaced by a QuantLinear."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def __repr__(self):
            return "FluteQuantize"

        @torch.no_grad()
        def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
            from flute.calibrate import quant_linear
            from flute.quantize import quantize_weight
            from transformers.quantizers.quantizers_utils import get_module_from_name

            cfg = self.hf_quantizer.quantization_config
            (key, value), = input_dict.items()
            weight = value[0] if isinstance(value, list) else value
            module_name = full_layer_name.rpartition(".")[0]
            linear, _ = get_module_from_name(model, full_layer_name)
            if tuple(weight.shape) != (linear.out_features, linear.in_features):
                raise ValueError(f"flute: {full_layer_name} in the checkpoint has shape "
                                 f"{tuple(weight.shape)}; the model expects "
                                 f"{(linear.out_features, linear.in_features)}")
            dtype = weight.dtype if weight.is_floating_point() else torch.float16
            qw = quantize_weight(weight, cfg.bits, cfg.group_size, scale_dtype=dtype,
                                 **cfg.quantize_kwargs())
            bias = linear.bias
            q = quant_linear(qw, None if bias is None else bias)
            if bias is not None and bias.is_meta:
                q.bias = nn.Parameter(torch.empty(bias.shape, dtype=dtype, device="meta"),
                                      requires_grad=False)
            # not prepare()d here: transformers refills non-persistent buffers (the kernel layout)
            # with empty tensors after loading; _process_model_after_weight_loading builds it
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, q)
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
            return {}

    class FluteHfQuantizer(HfQuantizer):
        """transformers quantizer for ``quant_method="flute"`` (CPU and GPU; no calibration on load)."""

        requires_calibration = False
        requires_parameters_quantization = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.modules_to_not_convert: List[str] = []

        # -- environment and dtype -----------------------------------------------------------
        def validate_environment(self, *args, **kwargs):
            cfg = self.quantization_config
            if self.pre_quantized and int(getattr(cfg, "format_version", FORMAT_VERSION)) != FORMAT_VERSION:
                raise ValueError(f"this checkpoint was written in flute format version "
                                 f"{cfg.format_version}; this flute reads version {FORMAT_VERSION}")
            if not self.pre_quantized and cfg.method != "rtn":
                raise ValueError("quantize-on-load is data-free (method='rtn'); for GPTQ-LUT use "
                                 "`flute quantize SRC OUT --method gptq` or "
                                 "flute.calibrate.quantize_model_calibrated, then load the result")
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("flute does not support disk offload in device_map")

        def update_dtype(self, dtype):
            return dtype

        @property
        def quantized_element_size(self):
            return self.quantization_config.bits / 8  # bytes per weight element (device_map sizing)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self):
            return True

        def _skip(self, name: str) -> bool:
            return _matches(name, self.modules_to_not_convert)

        # -- quantize on load --------------------------------------------------------------
        def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
            if self.pre_quantized:
                return False
            module_name, _, tensor = param_name.rpartition(".")
            if tensor != "weight":
                return False
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                return False
            return type(module) is nn.Linear and not self._skip(module_name)

        def get_quantize_ops(self):
            return FluteQuantize(self)

        # -- before / after loading ------------------------------------------------------------
        def _process_model_before_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            keep = getattr(model, "_keep_in_fp32_modules", None) or []
            self.modules_to_not_convert = self.get_modules_to_not_convert(
                model, cfg.modules_to_not_convert, list(keep), add_default_skips=True)
            if not self.pre_quantized:
                return model
            index = _checkpoint_index(kwargs.get("checkpoint_files"))
            prefix = getattr(model, "base_model_prefix", "") or ""
            for name, module in list(model.named_modules()):
                if type(module) is not nn.Linear:
                    continue
                spec = self._module_spec(name, module, index, prefix)
                if spec is None:
                    continue
                q = QuantLinear(module.in_features, module.out_features, spec["bits"],
                                spec["group_size"], bias=module.bias is not None,
                                offsets=spec["offsets"], dtype=spec["dtype"], device="meta")
                q.table = torch.empty(2 ** spec["bits"], dtype=torch.float32, device="meta")
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, q)
            return model

        def _module_spec(self, name, module, index, prefix):
            """What QuantLinear ``name`` must be, from the checkpoint headers (or the config)."""
            cfg = self.quantization_config
            default_dtype = module.weight.dtype
            if index is None:  # no headers to read: trust the config
                if self._skip(name):
                    return None
                return dict(bits=cfg.bits, group_size=cfg.group_size, offsets=cfg.offsets,
                            dtype=default_dtype)
            key = None
            for cand in (name, f"{prefix}.{name}" if prefix else None,
                         name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
                if cand is not None and any(f"{cand}.{t}" in index for t in _TENSORS):
                    key = cand
                    break
            if key is None:
                if any(c in index for c in (f"{name}.weight", f"{prefix}.{name}.weight",
                                            name[len(prefix) + 1:] + ".weight" if prefix else "")):
                    return None  # kept in full precision
                if self._skip(name):
                    return None  # e.g. a tied lm_head with no tensor of its own
                raise KeyError(f"flute checkpoint has no tensors for module {name!r} (neither "
                               f"{name}.qcodes/scales/table/qmeta nor {name}.weight)")
            missing = [f"{key}.{t}" for t in _TENSORS if f"{key}.{t}" not in index]
            if missing:
                raise KeyError(f"flute checkpoint is missing tensor(s) {missing} of module {name!r}")
            meta = parse_qmeta(_read_tensor(index[f"{key}.qmeta"], f"{key}.qmeta"), f"{key}.")
            bits, group = meta["bits"], meta["group_size"]
            if (meta["out_features"], meta["in_features"]) != (module.out_features, module.in_features):
                raise ValueError(f"{name}: the checkpoint holds a {meta['out_features']}x"
                                 f"{meta['in_features']} weight, the model's layer is "
                                 f"{module.out_features}x{module.in_features}")
            n, k = module.out_features, module.in_features
            want = {"qcodes": (n, packed_row_bytes(k, bits)), "scales": (n, num_groups(group, k)),
                    "table": (2 ** bits,), "qmeta": (5,)}
            has_offsets = f"{key}.offsets" in index
            if has_offsets:
                want["offsets"] = want["scales"]
            for t, shape in want.items():
                got = index[f"{key}.{t}"][1]
                if t == "table" and math.prod(got) != 2 ** bits:
                    raise ValueError(f"{key}.table has {math.prod(got)} entries; a "
                                     f"{bits}-bit table needs {2 ** bits}")
                if tuple(got) != shape:
                    raise ValueError(f"{key}.{t} has shape {tuple(got)} in the checkpoint; a "
                                     f"{n}x{k} {bits}-bit weight with group size {group} needs "
                                     f"{shape}")
            if index[f"{key}.qcodes"][0] != "U8":
                raise ValueError(f"{key}.qcodes must be uint8, the checkpoint has "
                                 f"{index[f'{key}.qcodes'][0]}")
            dtype = _ST_DTYPES.get(index[f"{key}.scales"][0])
            if dtype is None:
                raise ValueError(f"{key}.scales must be a float tensor, the checkpoint has "
                                 f"{index[f'{key}.scales'][0]}")
            return dict(bits=bits, group_size=group, offsets=has_offsets, dtype=dtype)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, m in model.named_modules():
                if not isinstance(m, QuantLinear):
                    continue
                if m.qcodes.is_meta or m.scales.is_meta:
                    if m.qweight is not None:
                        continue
                    raise ValueError(f"flute: {name} was not loaded (its tensors are still on the "
                                     "meta device); the checkpoint is missing them")
                if m.qcodes.numel() == 0 and m.qweight is not None:
                    continue  # quantized on load: already prepared
                meta = parse_qmeta(m.qmeta.cpu(), f"{name}.")
                mine = (m.bits, m.group_size, m.in_features, m.out_features)
                theirs = (meta["bits"], meta["group_size"], meta["in_features"], meta["out_features"])
                if mine != theirs:
                    raise ValueError(f"{name}: qmeta says (bits, group, in, out) = {theirs}, the "
                                     f"layer was built as {mine}")
                m.table = m.table.float()
                QuantizedWeight(m.qcodes, m.scales, m.table, m.bits, m.group_size, m.in_features,
                                m.out_features, m.offsets)  # raises on any shape/dtype mismatch
                m.prepare()
            model.flute_config = self.quantization_config.to_dict()
            return model

        def _dequantize(self, model, dtype=None):
            for name, m in list(model.named_modules()):
                if isinstance(m, QuantLinear):
                    w = m.dequantize()
                    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                    device=w.device, dtype=dtype or w.dtype)
                    lin.weight.data.copy_(w)
                    if m.bias is not None:
                        lin.bias.data.copy_(m.bias)
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, lin)
            return model

    for cls in (FluteConfig, FluteHfQuantizer, FluteQuantize):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _classes.update(FluteConfig=FluteConfig, FluteHfQuantizer=FluteHfQuantizer,
                    FluteQuantize=FluteQuantize)

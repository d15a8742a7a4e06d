"""``FluteHfQuantizer``: how transformers loads, quantizes on load and saves ``flute`` models.

Imports transformers; registered by :func:`flute.integrations.huggingface.register`. Loading a
pre-quantized checkpoint validates it from the safetensors headers before any weight is read
(format version, missing tensors, shapes, table size) and names the module and tensor at fault.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from flute.format import FORMAT_VERSION, check_weight_tensors
from flute.linear import QuantLinear
from flute.model import gemv_unquantized
from flute.modules import matches, set_submodule
from flute.quantize import name_errors, quantize_weight

_TENSORS = ("qcodes", "scales", "table", "qmeta")  # plus optional offsets


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
              "F64": torch.float64, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _Header:
    """A checkpoint tensor as its safetensors header describes it (dtype and shape, no values)."""

    def __init__(self, entry):
        self.dtype = _ST_DTYPES.get(entry[0], entry[0])  # an unknown dtype stays a string
        self.shape = tuple(entry[1])


class FluteQuantize(ConversionOps):
    """Quantize-on-load op: one float ``weight`` in, its ``nn.Linear`` replaced by a QuantLinear."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def __repr__(self):
        return "FluteQuantize"

    @torch.no_grad()
    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
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
        bias = linear.bias
        with name_errors(module_name):  # a scale that overflows, an fp8 weight, a NaN bias
            qw = quantize_weight(weight, scale_dtype=dtype, **cfg.quantize_kwargs())
            q = QuantLinear.from_quantized(qw, None if bias is None or bias.is_meta else bias,
                                           prepare=False)
        if bias is not None and bias.is_meta:  # loaded later, into the model dtype
            q.bias = nn.Parameter(torch.empty(bias.shape, dtype=qw.scales.dtype, device="meta"),
                                  requires_grad=False)
        # not prepare()d here: transformers refills non-persistent buffers (the kernel layout)
        # with empty tensors after loading; _process_model_after_weight_loading builds it
        set_submodule(model, module_name, q)
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
        return matches(name, self.modules_to_not_convert)

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
            set_submodule(model, name, q)
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
        # dtypes and shapes from the headers, qmeta's values: the shared check of every load path
        headers = {t: _Header(index[f"{key}.{t}"]) for t in _TENSORS + ("offsets", "bias")
                   if f"{key}.{t}" in index}
        headers["qmeta"] = _read_tensor(index[f"{key}.qmeta"], f"{key}.qmeta")
        meta = check_weight_tensors(headers, f"{key}.", expect=dict(
            in_features=module.in_features, out_features=module.out_features))
        return dict(bits=meta["bits"], group_size=meta["group_size"],
                    offsets="offsets" in headers, dtype=headers["scales"].dtype)

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
            # the values now: qmeta, dtypes, shapes, and NaN/Inf in scales, offsets, table, bias
            tensors = {t: getattr(m, t) for t in ("qcodes", "scales", "offsets", "table", "bias")}
            tensors["qmeta"] = m.qmeta.cpu()
            check_weight_tensors(tensors, f"{name}.", expect=dict(
                bits=m.bits, group_size=m.group_size, in_features=m.in_features,
                out_features=m.out_features))
            m.table = m.table.float()
            m.prepare()
        if any(p.device.type == "cpu" for p in model.parameters()):
            # the plain nn.Linear layers left (a bf16 lm_head) decode through flute's bf16 kernel
            # on the CPU (same parameters and state dict; torch's bf16 mm at one row read it at
            # ~12-15 GB/s: flute.linear.GemvLinear)
            gemv_unquantized(model)
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
                set_submodule(model, name, lin)
        return model

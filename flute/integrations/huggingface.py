"""Hugging Face transformers (5.x) integration: quant method ``"flute"``.

:func:`register` adds :class:`~flute.integrations.hf_config.FluteConfig` and
:class:`~flute.integrations.hf_quantizer.FluteHfQuantizer` to transformers with its own
``register_quantization_config`` / ``register_quantizer`` (no patching). ``import flute`` calls
it; it is idempotent and returns False when transformers is not installed. Then:

- ``flute.quantize_model(model, bits=3, group_size=64)`` (or
  :func:`flute.calibrate.quantize_model_calibrated`) on a transformers model, then
  ``model.save_pretrained(dir)``, writes ``quantization_config`` (``quant_method: "flute"``) into
  ``config.json`` and the canonical tensors (``qcodes``, ``scales``, ``offsets``, ``table``,
  ``qmeta``) into the safetensors files; ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds
  the same model on any device (``device_map`` works; CPU-made checkpoints load on a GPU and back).
- ``from_pretrained(fp_dir, quantization_config=FluteConfig(bits=4, group_size=64))`` quantizes
  while loading, one weight at a time, without data.

This module imports transformers only inside :func:`register` and :func:`attach_config`.
"""
from __future__ import annotations

import importlib.util

from torch import nn

from flute.spec import QUANT_METHOD


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def register() -> bool:
    """Register the ``flute`` quant method with transformers; True when it is (now or before)."""
    if not transformers_available():
        return False
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                              AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                              register_quantizer)

    from .hf_config import FluteConfig
    from .hf_quantizer import FluteHfQuantizer
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not FluteConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reload
        register_quantization_config(QUANT_METHOD)(FluteConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not FluteHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(FluteHfQuantizer)
    return True


def attach_config(model: nn.Module, settings: dict) -> bool:
    """Record ``settings`` on a transformers model as its FluteConfig and attach a pre-quantized
    FluteHfQuantizer, so that ``save_pretrained`` works; False if this is not possible."""
    if not register() or not hasattr(getattr(model, "config", None), "to_dict"):
        return False
    from .hf_config import FluteConfig
    from .hf_quantizer import FluteHfQuantizer
    cfg = FluteConfig.from_dict(dict(settings))
    model.config.quantization_config = cfg
    model.hf_quantizer = FluteHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if hasattr(model.config, "_is_quantized"):
        model.config._is_quantized = True
    return True

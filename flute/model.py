"""``quantize_model``: replace the ``nn.Linear`` layers of a model by ``QuantLinear`` in place; helpers on
quantized models (``cast_unquantized``, ``gemv_unquantized``, ``model_weight_bytes``)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .huge_pages import place_weight_for_streaming
from .linear import GemvLinear, QuantLinear
from .modules import layer_progress, linear_layers, set_submodule, skipped_linear_names
from .quantize import name_errors
from .spec import DEFAULT_SKIP, QuantSpec


def quantize_model(model: nn.Module, bits: int = 3, group_size: int = 64, codebook="nf",
                   scale_method: Optional[str] = None, offsets: bool = False,
                   learned_table: bool = False, skip: Iterable[str] = DEFAULT_SKIP,
                   device=None, progress: bool = True, spec: Optional[QuantSpec] = None) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place (round to nearest, data-free) and return it.

    Args:
        model: any ``nn.Module``; Hugging Face models get their config updated too.
        bits, group_size, codebook, scale_method, offsets, learned_table: as in
            :func:`flute.quantize_weight`, applied to every layer.
        skip: module names or glob patterns left in full precision (``lm_head`` by default;
            embeddings are never ``nn.Linear`` and so are never touched). A pattern matches the
            full name, a name ending in ``.pattern``, or ``fnmatch`` style globs such as
            ``"*.mlp.down_proj"``.
        device: where to do the quantization arithmetic (e.g. ``"cuda"`` for speed); each layer
            returns to the device it came from. Defaults to each weight's own device.
        progress: show a progress bar.
        spec: all the settings above as one :class:`flute.QuantSpec` (then they must be left at
            their defaults).

    Layers are quantized one at a time, and each float weight is dropped once its layer is
    replaced, so peak memory stays near the model's own size. The quantization settings are
    recorded as ``model.flute_config`` and, for Hugging Face models, as
    ``model.config.quantization_config`` with ``quant_method="flute"``.
    """
    if spec is None:
        spec = QuantSpec(bits=bits, group_size=group_size, codebook=codebook,
                         scale_method=scale_method, offsets=offsets, learned_table=learned_table,
                         skip=tuple(skip))
    elif spec.method != "rtn":
        raise ValueError("quantize_model is data-free round to nearest; for method='gptq' use "
                         "flute.calibrate.quantize_model_calibrated")
    targets = linear_layers(model, spec.skip)
    if not targets:
        raise ValueError("quantize_model: the model has no nn.Linear layer left to quantize "
                         f"(skip patterns: {spec.skip})")
    bar = layer_progress(targets, progress,
                         desc=f"flute: quantizing {len(targets)} layers to {spec.bits} bits")
    for name, linear in bar:
        home = linear.weight.device
        work = linear if device is None else linear.to(device)
        with name_errors(name):  # a scale that overflows, a NaN bias, ...: name the layer
            q = QuantLinear.from_linear(work, **spec.quantize_kwargs())
        set_submodule(model, name, q.to(home))
        del work, linear
    record_config(model, spec, quantized_modules=len(targets))
    return model


def record_config(model: nn.Module, spec: QuantSpec, **extra) -> None:
    """Store the quantization settings on the model (and on a Hugging Face config, if any).

    ``modules_to_not_convert`` lists the skip patterns plus every linear layer they kept.
    """
    kept = [s for s in skipped_linear_names(model, spec.skip) if s not in spec.skip]
    config = spec.to_dict(**extra)
    config["modules_to_not_convert"] = list(spec.skip) + kept
    model.flute_config = config
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        # A transformers model gets a FluteConfig + quantizer (so save_pretrained works); the
        # integration is imported lazily and declines (False) when transformers is missing.
        from .integrations.huggingface import attach_config
        if not attach_config(model, config):
            hf_config.quantization_config = dict(config)


def cast_unquantized(model: nn.Module, dtype: torch.dtype, min_elements: int = 0) -> nn.Module:
    """Cast the floating-point parameters and buffers outside :class:`QuantLinear` layers (the
    embeddings, norms, an unquantized ``lm_head``) to ``dtype`` in place and return the model; the
    quantized layers keep their scales, offsets and table as they are (their kernels take
    activations of any float dtype and return the activations' dtype).

    A model quantized from float32 still reads its float32 leftovers on every decode step (for
    SmolLM2-135M, the 113 MB tied embedding / ``lm_head`` against 57 MB of 4-bit layers); in bf16
    they cost half, as in a bf16 model.

    ``min_elements``: only tensors with at least this many elements are cast (e.g. ``1 << 16``: the
    embedding and ``lm_head``, not the norms and rotary buffers). The activations then stay in the
    model's float32 from the first norm on, with the bytes per token of the all-bf16 cast: the
    quantized layers take float32 activations, and a :class:`~flute.linear.GemvLinear`
    (:func:`gemv_unquantized`) multiplies them by its bf16 weight. On a CPU without native bf16
    arithmetic, SmolLM2-135M at 4 bits decoded 62.3 against 59.5 tokens/s (CPU_NOTES item 205).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not isinstance(min_elements, int) or min_elements < 0:
        raise ValueError(f"min_elements must be a non-negative int, got {min_elements!r}")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype and p.numel() >= min_elements:
                p.data = p.data.to(dtype)  # in place on the Parameter: tied weights stay tied
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype and b.numel() >= min_elements:
                setattr(module, name, b.to(dtype))
    return model


def gemv_unquantized(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` that quantization left in ``model`` (an ``lm_head``, skipped
    layers) by a :class:`~flute.linear.GemvLinear` holding the same parameters, in place; return
    how many were replaced.

    Results change by rounding only: bf16 products of a few activation rows (a decoding step) go
    through flute's own CPU kernel (``flute::bf16_gemv``), which reads the weight at the memory's
    rate where torch's ``mm`` did not, and float32 activations against a bf16 weight (see
    :func:`cast_unquantized`'s ``min_elements``) are accepted. For SmolLM2-135M at 4 bits with bf16
    leftovers, the bf16 ``lm_head`` (the 57 MB tied embedding) took ~28% of a decoding step's time
    through ``mm`` on an AMX VM and ~26% on a VM without native bf16; ``flute demo`` applies this on
    the CPU (CPU_NOTES items 170 and 205).

    Large CPU weights move into memory of their own wholly in huge pages
    (:func:`flute.huge_pages.place_weight_for_streaming`; tied weights stay tied): the 57 MB
    ``lm_head`` above took 0.90-0.95 of the time at 2 threads (CPU_NOTES item 289).
    """
    layers = linear_layers(model, skip=())
    moved = set()
    for name, linear in layers:
        set_submodule(model, name, GemvLinear.sharing(linear))
        if id(linear.weight) not in moved and place_weight_for_streaming(linear.weight):
            moved.add(id(linear.weight))
    return len(layers)


def model_weight_bytes(model: nn.Module) -> dict:
    """Bytes held by the model's parameters and persistent buffers: quantized layers, the rest."""
    quant, other = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant += m.checkpoint_nbytes()
    qparams = {id(t) for m in model.modules() if isinstance(m, QuantLinear)
               for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in qparams or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    return {"quantized": quant, "other": other, "total": quant + other}

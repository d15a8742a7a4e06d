"""``quantize_model``: replace the ``nn.Linear`` layers of a model by ``QuantLinear`` in place."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

import torch
from torch import nn

from .format import FORMAT_VERSION
from .linear import QuantLinear

DEFAULT_SKIP = ("lm_head",)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern if it equals it, ends with ``.pattern``, or fnmatches it."""
    for p in patterns:
        if name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p):
            return True
    return False


def linear_layers(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP):
    """``(name, module)`` of every ``nn.Linear`` that :func:`quantize_model` would replace."""
    skip = tuple(skip)
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and not _matches(n, skip)]


def quantize_model(model: nn.Module, bits: int = 3, group_size: int = 64, codebook="nf",
                   scale_method: Optional[str] = None, offsets: bool = False,
                   learned_table: bool = False, skip: Iterable[str] = DEFAULT_SKIP,
                   device=None, progress: bool = True) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place and return the model.

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

    Layers are quantized one at a time, and each float weight is dropped once its layer is
    replaced, so peak memory stays near the model's own size. The quantization settings are
    recorded as ``model.flute_config`` and, for Hugging Face models, as
    ``model.config.quantization_config`` with ``quant_method="flute"``.
    """
    skip = tuple(skip)
    targets = linear_layers(model, skip)
    if not targets:
        raise ValueError("quantize_model: the model has no nn.Linear layer left to quantize "
                         f"(skip patterns: {skip})")
    names = [n for n, _ in targets]
    bar = _progress(targets, progress, desc=f"flute: quantizing {len(targets)} layers to {bits} bits")
    for name, linear in bar:
        home = linear.weight.device
        work = linear if device is None else linear.to(device)
        q = QuantLinear.from_linear(work, bits, group_size, codebook=codebook,
                                    scale_method=scale_method, offsets=offsets,
                                    learned_table=learned_table)
        _set_submodule(model, name, q.to(home))
        del work, linear
    skipped = sorted({n for n, m in model.named_modules()
                      if type(m) is nn.Linear and _matches(n, skip)})
    record_config(model, dict(
        quant_method="flute", format_version=FORMAT_VERSION, bits=bits, group_size=group_size,
        codebook=codebook if isinstance(codebook, str) else "custom",
        scale_method=scale_method, offsets=offsets, learned_table=learned_table,
        modules_to_not_convert=list(skip) + [s for s in skipped if s not in skip],
        quantized_modules=len(names)))
    return model


def record_config(model: nn.Module, config: dict) -> None:
    """Store the quantization settings on the model (and on a Hugging Face config, if any)."""
    model.flute_config = config
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        # A transformers model gets a FluteConfig + quantizer (so save_pretrained works); the
        # integration is imported lazily and declines (False) when transformers is missing.
        from .integrations.huggingface import attach_config
        if not attach_config(model, config):
            hf_config.quantization_config = dict(config)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing progress bar must not stop the work
        return items
    return tqdm(items, desc=desc, unit="layer")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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

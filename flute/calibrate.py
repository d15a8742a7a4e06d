"""Calibrated quantization of a decoder model, one block at a time (GPTQ-LUT, activation-aware tables).

The usual sequential protocol: the calibration token sequences are run through the model up to
its first decoder block, and the inputs of that block are kept. Then, block by block:

1. the block's linear layers are grouped by shared input (q/k/v, gate/up, ...) in the order the
   block calls them;
2. for each group in turn, the block is run on the kept inputs, with the groups before it already
   quantized, up to the group's first layer; the inputs seen there give the group's Hessian
   ``H = 2/n X^T X`` (and its diagonal, the per-column second moments);
3. each layer of the group is quantized with GPTQ-LUT (:mod:`flute.gptq`) or, for the
   activation-aware table, with a table fitted by Lloyd weighted by those second moments and
   round-to-nearest;
4. the quantized block is run on the kept inputs, and its outputs become the next block's inputs.

Only one block sits on the work device at a time (the GPU when present), and the kept hidden
states are ``samples x tokens x hidden``, so memory stays bounded by one block plus the
activations. Nothing here imports transformers: any model whose decoder blocks form an
``nn.ModuleList`` and whose forward takes ``input_ids`` works.
"""
from __future__ import annotations

import contextlib
import time
from importlib import resources
from typing import Iterable, List, Optional

import torch
from torch import nn

from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, HessianAccumulator, gptq_quantize_weight
from .linear import QuantLinear
from .model import record_config
from .modules import layer_progress, linear_layers, set_submodule
from .quantize import name_errors, quantize_weight
from .spec import DEFAULT_SKIP, QuantSpec

DEFAULT_SEQ_LEN = 512


def builtin_calibration_text() -> str:
    """The calibration text shipped with flute (original prose, distinct from the eval text)."""
    return resources.files("flute").joinpath("data/calib_text.txt").read_text(encoding="utf-8")


def calibration_samples(tokenizer, text: Optional[str] = None, seq_len: int = DEFAULT_SEQ_LEN,
                        max_tokens: Optional[int] = None, min_len: int = 16) -> List[torch.Tensor]:
    """Tokenize ``text`` (the built-in calibration text by default) into ``[1, L]`` id tensors of at
    most ``seq_len`` tokens (non-overlapping; a tail shorter than ``min_len`` is dropped)."""
    text = builtin_calibration_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt")["input_ids"].reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    samples = [ids[i:i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]
    samples = [s for s in samples if s.shape[1] >= min_len]
    if not samples:
        raise ValueError(f"the calibration text gives only {ids.numel()} tokens; need at least {min_len}")
    return samples


def find_decoder_layers(model: nn.Module):
    """``(name, ModuleList)`` of the model's decoder blocks: the longest ``nn.ModuleList`` whose
    entries all hold ``nn.Linear`` layers."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(
                any(isinstance(x, nn.Linear) for x in block.modules()) for block in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError("calibrated quantization needs a model whose decoder blocks form an "
                         "nn.ModuleList of modules containing nn.Linear layers; none was found")
    return best


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@contextlib.contextmanager
def _single_thread(enabled: bool):
    """The GPTQ column sweep is hundreds of tiny ops: on CPU one thread beats two (no spin-waits)."""
    if not enabled:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _tensors_to(module: nn.Module, device, exclude: nn.Module):
    """Move every parameter/buffer of ``module`` outside ``exclude`` to ``device``; return an undo list."""
    inside = {id(t) for t in list(exclude.parameters()) + list(exclude.buffers())}
    undo = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, t in store.items():
                if t is None or id(t) in inside or t.device == torch.device(device):
                    continue
                undo.append((t, t.data))
                t.data = t.data.to(device)
    return undo


def _undo(undo):
    for t, data in undo:
        t.data = data


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, samples, device):
    """Run each sample up to the first decoder block; return its ``(args, kwargs)`` per sample."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((_to_device(args, device), _to_device(kwargs, device)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    undo = _tensors_to(model, device, layers)
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        _undo(undo)
    if len(captured) != len(samples):
        raise RuntimeError("the first decoder block was not reached by the model's forward pass")
    return captured


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


def _run_block(block, inputs):
    outs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@torch.no_grad()
def input_groups(block: nn.Module, names: List[str], sample) -> List[List[str]]:
    """Group ``names`` (linear layers of ``block``) by the input tensor they read, in call order."""
    modules = dict(block.named_modules())
    order, refs, handles = [], [], []

    def make(name):
        def hook(module, args):
            refs.append(args[0])  # keep it alive so that ids stay unique during the pass
            order.append((name, id(args[0])))
        return hook

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(make(n)))
    try:
        args, kwargs = sample
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups, seen, by_input = [], set(), {}
    for name, key in order:
        if name in seen:
            continue
        seen.add(name)
        if key not in by_input:
            by_input[key] = []
            groups.append(by_input[key])
        by_input[key].append(name)
    uncalled = [n for n in names if n not in seen]
    return groups, uncalled


@torch.no_grad()
def _group_statistics(block, module: nn.Module, inputs) -> HessianAccumulator:
    """Accumulate the Hessian of ``module``'s inputs over all samples, stopping each pass there."""
    acc = HessianAccumulator(module.in_features, device=module.weight.device)

    def hook(mod, args):
        acc.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for args, kwargs in inputs:
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc


@torch.no_grad()
def activation_aware_quantize(weight: torch.Tensor, importance: torch.Tensor, bits: int = 4,
                              group_size: int = 64, codebook="nf", scale_method=None,
                              offsets: bool = False, learned_table: bool = True,
                              scale_dtype: Optional[torch.dtype] = None):
    """Round to nearest on an activation-aware learned table, with activation-aware scales.

    The table is fitted by Lloyd (:func:`flute.learn_table`) with every element weighted by its
    input column's second moment ``importance[k] = E[x_k^2]``, so that it spends its entries where
    the layer's output error is made. Each group's scale is then the absmax scale shrunk by the
    clipping ratio (1.0, 0.975, ...) that minimizes the same importance-weighted squared error:
    clipping is accepted only where the columns it hurts carry little activation. ``codebook``
    other than NF, ``scale_method`` and ``offsets`` fall back to :func:`flute.quantize_weight`.
    """
    import math

    from .format import QuantizedWeight, effective_group_size, pack_codes
    from .quantize import (LEARNED_RANGE, _Groups, _chunk_rows, check_importance,
                           check_scale_dtype, check_stored_finite, check_weight, learn_table,
                           weighted_clip_search)
    check_weight(weight)
    scale_dtype = check_scale_dtype(scale_dtype or weight.dtype)
    importance = check_importance(importance, weight.shape[1])
    if offsets or scale_method not in (None, "absmax", "mse") or codebook != "nf":
        return quantize_weight(weight, bits, group_size, codebook=codebook, scale_method=scale_method,
                               offsets=offsets, learned_table=True, scale_dtype=scale_dtype,
                               importance=importance)
    n, k = weight.shape
    group = effective_group_size(group_size, k)
    imp = importance.to(weight.device, torch.float32).flatten().clamp_min(0)
    table = learn_table(weight, bits, group_size, importance=imp)
    sorted_t, order = torch.sort(table.to(weight.device))
    ng = math.ceil(k / group)
    lam = torch.nn.functional.pad(imp, (0, ng * group - k)).view(ng, group)
    codes_out, scales_out = [], []
    for r0 in range(0, n, _chunk_rows(n, k)):
        chunk = weight[r0:r0 + _chunk_rows(n, k)]
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"weight holds NaN or Inf values (in rows {r0}..{r0 + len(chunk) - 1}); "
                             "refusing to quantize")
        g = _Groups(chunk, group)
        best_s, idx = weighted_clip_search(g.w, lam, sorted_t, LEARNED_RANGE, scale_dtype)
        check_stored_finite(best_s, None, scale_dtype, r0)
        best_c = order[idx]
        codes_out.append(pack_codes(g.flat(best_c), bits))
        scales_out.append(best_s.to(scale_dtype))
    return QuantizedWeight(torch.cat(codes_out), torch.cat(scales_out), table.to(weight.device),
                           bits, group_size, k, n, None, "learned")


@torch.no_grad()
def quantize_model_calibrated(model: nn.Module, samples: Optional[Iterable[torch.Tensor]] = None, *,
                              bits: int = 3, group_size: int = 64, codebook="nf",
                              method: str = "gptq", learned_table: bool = False,
                              act_aware: bool = True, scale_method: Optional[str] = None,
                              offsets: bool = False, skip: Iterable[str] = DEFAULT_SKIP,
                              damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                              device=None, scale_dtype: Optional[torch.dtype] = None,
                              progress: bool = True, spec: Optional[QuantSpec] = None) -> nn.Module:
    """Quantize every ``nn.Linear`` of a decoder model in place, using calibration data when needed.

    Args:
        model: a causal LM (e.g. a transformers ``LlamaForCausalLM``) whose forward accepts
            ``input_ids`` and ``use_cache``.
        samples: calibration token ids, a list of ``[1, L]`` tensors (see
            :func:`calibration_samples`). Needed for ``method="gptq"`` and for the
            activation-aware table; ignored otherwise.
        bits, group_size, scale_method, offsets, skip: as in :func:`flute.quantize_model`.
        codebook: ``"nf"``, ``"int"``, ``"fp4"``, ``"ternary"``, a tensor, or ``"learned"``
            (shorthand for NF-initialized ``learned_table=True``).
        method: ``"gptq"`` (GPTQ-LUT error feedback) or ``"rtn"`` (round to nearest).
        learned_table: fit one table per matrix by Lloyd. With calibration data and ``act_aware``
            (the default) the fit is weighted by the inputs' per-column second moments
            (:func:`activation_aware_quantize`).
        act_aware: use the inputs' second moments for the learned table and, when
            ``scale_method`` is None, for the group scales (an activation-weighted clipping
            search; GPTQ runs it on the error-updated weights at each group start).
        damp, block_size: GPTQ damping (fraction of the mean Hessian diagonal) and block width.
        device: where blocks are processed (default: CUDA if available, else where the model is).
            Each block returns to its own device afterwards.
        scale_dtype: dtype of the stored scales (default: each weight's dtype).
        progress: show progress bars.
        spec: bits, group_size, codebook, method, learned_table, scale_method, offsets and skip as
            one :class:`flute.QuantSpec` (then those arguments must be left at their defaults).

    Data-free settings (``rtn`` without an activation-aware table) quantize layer by layer without
    running the model. The settings are recorded on the model as :func:`flute.quantize_model` does.
    """
    if spec is None:
        spec = QuantSpec(bits=bits, group_size=group_size, codebook=codebook, method=method,
                         learned_table=learned_table, scale_method=scale_method, offsets=offsets,
                         skip=tuple(skip))
    qkw = spec.quantize_kwargs()
    method, learned_table, skip = spec.method, spec.learned_table, spec.skip
    calibrated = method == "gptq" or (learned_table and act_aware)
    t0 = time.perf_counter()
    targets = linear_layers(model, skip)
    if not targets:
        raise ValueError("quantize_model_calibrated: the model has no nn.Linear layer to quantize "
                         f"(skip patterns: {skip})")
    n_tokens = 0
    if not calibrated:
        bar = layer_progress(targets, progress, desc=f"flute: quantizing {len(targets)} layers "
                                                f"to {spec.bits} bits")
        for name, linear in bar:
            with name_errors(name):
                qw = quantize_weight(linear.weight.detach() if device is None else
                                     linear.weight.detach().to(device),
                                     scale_dtype=scale_dtype or linear.weight.dtype, **qkw)
                q = QuantLinear.from_quantized(qw, linear.bias, prepare=False)
            set_submodule(model, name, q.to(linear.weight.device))
    else:
        samples = list(samples or [])
        if not samples:
            raise ValueError(f"method={method!r}" + (" with an activation-aware table" if
                             method == "rtn" else "") + " needs calibration samples")
        n_tokens = sum(int(s.numel()) for s in samples)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
        device = torch.device(device)
        _calibrated_pass(model, samples, targets, skip, device, method, act_aware, damp,
                         block_size, scale_dtype, progress, qkw)
    record_config(model, spec, act_aware=bool(learned_table and act_aware and calibrated),
                  quantized_modules=len(targets),
                  calibration=dict(tokens=n_tokens, damp=damp, block_size=block_size)
                  if calibrated else None)
    model.flute_quantize_seconds = time.perf_counter() - t0
    return model


def _check_bias(bias) -> None:
    """Refuse a NaN/Inf bias before a layer is quantized (QuantLinear.from_quantized refuses it too;
    checking first spares the GPTQ sweep of a layer that cannot be stored)."""
    if bias is not None and not bias.is_meta and not bool(torch.isfinite(bias).all()):
        raise ValueError("bias holds NaN or Inf values; refusing to quantize")


def _calibrated_pass(model, samples, targets, skip, device, method, act_aware, damp, block_size,
                     scale_dtype, progress, qkw):
    prefix, layers = find_decoder_layers(model)
    target_names = {n for n, _ in targets}
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layers, samples, device)
    on_cpu = device.type == "cpu"
    bar = layer_progress(list(enumerate(layers)), progress,
                    desc=f"flute: {method} {qkw['bits']}-bit, {len(layers)} blocks")
    done, structure = set(), {}
    for i, block in bar:
        block_name = f"{prefix}.{i}" if prefix else str(i)
        home = next(block.parameters()).device
        block.to(device)
        names = [n for n, m in block.named_modules()
                 if type(m) is nn.Linear and f"{block_name}.{n}" in target_names]
        signature = (type(block), tuple(names))
        if signature not in structure:  # blocks of one kind share their grouping
            structure[signature] = input_groups(block, names, inputs[0])
        groups, uncalled = structure[signature]
        quantized = {}
        for group in groups + [[n] for n in uncalled]:
            mods = dict(block.named_modules())
            acc = None if group[0] in uncalled else _group_statistics(block, mods[group[0]], inputs)
            for n in group:
                lin = mods[n]
                w = lin.weight.detach()
                sd = scale_dtype or w.dtype
                with name_errors(f"{block_name}.{n}"):
                    _check_bias(lin.bias)
                    if acc is None:
                        qw = quantize_weight(w, scale_dtype=sd, **qkw)
                    elif method == "gptq":
                        with _single_thread(on_cpu):
                            m2 = acc.second_moments()
                            qw = gptq_quantize_weight(
                                w, acc.hessian(), damp=damp, block_size=block_size,
                                scale_dtype=sd, importance=m2 if act_aware else torch.ones_like(m2),
                                scale_importance=m2 if act_aware and qkw["scale_method"] is None
                                else None, **qkw)
                    elif qkw["learned_table"] and act_aware:
                        qw = activation_aware_quantize(w, acc.second_moments(), scale_dtype=sd,
                                                       **qkw)
                    else:
                        qw = quantize_weight(w, scale_dtype=sd, **qkw)
                # Later passes over this block see the quantized weight; a plain dense copy is
                # faster than the LUT path here and numerically the same.
                lin.weight.data = qw.dequantize(w.dtype)
                quantized[n] = qw
            del acc
        outs = _run_block(block, inputs)
        inputs = [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outs)]
        for n, qw in quantized.items():
            set_submodule(block, n, QuantLinear.from_quantized(qw, block.get_submodule(n).bias, prepare=False))
            done.add(f"{block_name}.{n}")
        block.to(home)
    # linear layers outside the decoder blocks (rare): data-free
    for name, linear in targets:
        if name not in done:
            with name_errors(name):
                qw = quantize_weight(linear.weight.detach(), scale_dtype=scale_dtype or
                                     linear.weight.dtype, **qkw)
                q = QuantLinear.from_quantized(qw, linear.bias, prepare=False)
            set_submodule(model, name, q)
    model.train(was_training)

"""vLLM plugin: serve flute checkpoints (or quantize at load) with ``vllm serve``.

vLLM finds this module through the ``vllm.general_plugins`` entry point ``flute`` declared in
``setup.py`` and calls :func:`register` in every vLLM process. Registration adds a quantization
method named ``flute`` with vLLM's public ``register_quantization_config``; nothing in vLLM is
patched. This module itself never imports vLLM at import time: the vLLM-dependent classes live in
:mod:`flute.integrations.vllm_method`, imported by :func:`register`.

Two ways in:

* **Pre-quantized checkpoint** (``config.json`` holds ``quantization_config`` with
  ``quant_method: "flute"``, tensors ``<module>.qcodes/.scales/[.offsets]/.table/.qmeta``):
  ``vllm serve DIR`` picks the method up from the config; no flag needed.
* **Unquantized checkpoint** with ``--quantization flute``: the float weights are loaded as usual
  and quantized data-free in ``process_weights_after_loading`` (4 bits, group size 64, NF table by
  default). Override the settings with ``--hf-overrides
  '{"quantization_config_dict_json": "{\\"bits\\": 3, \\"group_size\\": 128}"}'`` (or
  ``{"quantization_config_file": "path.json"}``), the hooks vLLM offers for exactly this.

Tensor parallelism (how each rank gets its shard of the canonical format):

* Column-parallel layers (and the merged gate/up and QKV layers) split the output rows N:
  ``qcodes``, ``scales`` and ``offsets`` are row slices, since every packed row starts on a byte.
* Row-parallel layers split the input features K: each rank takes the byte slice
  ``[r * K_p * bits / 8, (r + 1) * K_p * bits / 8)`` of every packed row and the group-scale
  columns ``[r * K_p / G, (r + 1) * K_p / G)``. This needs ``K_p * bits`` to be a multiple of 8 and
  ``K_p`` a multiple of the group size G, so that no byte and no group straddles two ranks;
  :func:`check_input_partition` raises a clear error otherwise. With ``group_size == -1`` (one
  scale per row) every rank keeps the full per-row scales.
* ``table`` (one per weight matrix in the checkpoint) and ``qmeta`` become one row per *logical*
  matrix of the layer (1 for plain layers, 2 for gate/up, 3 for q/k/v), replicated on every rank.
  After loading, consecutive logical matrices whose tables are equal share one kernel call (the
  usual case: a fixed NF table); otherwise each logical matrix runs its own ``torch.ops.flute``
  call with its own table and the outputs are concatenated. Nothing is re-quantized, so the
  served model computes exactly what the checkpoint describes.
"""
from __future__ import annotations

import fnmatch
import json
import math
from typing import Iterable, Optional

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
QUANT_METHOD = "flute"

# Fields of the checkpoint's ``quantization_config`` (as written by flute.quantize_model) that the
# plugin uses; anything else in the dict is ignored.
_SETTINGS = ("bits", "group_size", "codebook", "scale_method", "offsets", "learned_table",
             "modules_to_not_convert")

_registered = False


def register() -> None:
    """Register the ``flute`` quantization method with vLLM (idempotent; imports vLLM lazily)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from . import vllm_method  # imports vLLM and flute (which registers torch.ops.flute)

    register_quantization_config(QUANT_METHOD)(vllm_method.FluteConfig)
    _registered = True


# -- settings --------------------------------------------------------------------------------------
def parse_settings(config: Optional[dict], pre_quantized: bool) -> dict:
    """Normalise a ``quantization_config`` dict (or overrides) into the plugin's settings.

    Raises ValueError for another quant method, a foreign format version or bad bits/group size.
    """
    from flute.codebooks import check_bits
    from flute.format import FORMAT_VERSION, check_group_size

    config = dict(config or {})
    method = config.get("quant_method", QUANT_METHOD)
    method = getattr(method, "value", method)
    if str(method).lower() != QUANT_METHOD:
        raise ValueError(f"flute: the quantization_config is for quant_method={method!r}, "
                         f"not {QUANT_METHOD!r}")
    version = config.get("format_version", FORMAT_VERSION)
    if int(version) != FORMAT_VERSION:
        raise ValueError(f"flute: the checkpoint uses flute format version {version}; this flute "
                         f"reads version {FORMAT_VERSION}")
    unknown = sorted(set(config) - set(_SETTINGS) - {"quant_method", "format_version",
                                                     "quantized_modules"})
    if not pre_quantized and unknown:
        raise ValueError(f"flute: unknown quantization settings {unknown}; "
                         f"known: {list(_SETTINGS)}")
    bits = int(config.get("bits", DEFAULT_BITS))
    group_size = int(config.get("group_size", DEFAULT_GROUP_SIZE))
    check_bits(bits)
    check_group_size(group_size)
    codebook = config.get("codebook") or "nf"
    if not pre_quantized:
        from flute.codebooks import CODEBOOKS
        if codebook not in CODEBOOKS:
            raise ValueError(f"flute: quantizing at load needs a named codebook {CODEBOOKS}, "
                             f"got {codebook!r}")
    skip = config.get("modules_to_not_convert") or []
    if isinstance(skip, str):
        skip = [skip]
    return dict(
        bits=bits, group_size=group_size,
        codebook=codebook,
        scale_method=config.get("scale_method"),
        offsets=bool(config.get("offsets", False)),
        learned_table=bool(config.get("learned_table", False)),
        modules_to_not_convert=[str(s) for s in skip],
        pre_quantized=pre_quantized,
    )


def settings_from_json(text: str) -> dict:
    """Online-quantization settings from a JSON object string (``--hf-overrides`` hook)."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"flute: quantization_config_dict_json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("flute: quantization_config_dict_json must be a JSON object")
    return parse_settings(config, pre_quantized=False)


def settings_from_file(path: str) -> dict:
    with open(path) as f:
        return settings_from_json(f.read())


# -- module selection ------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    """flute.quantize_model's ``skip`` rule: equal, ``*.pattern`` suffix, or fnmatch glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def is_skipped(prefix: str, patterns: Iterable[str], packed_modules_mapping: dict) -> bool:
    """Whether the vLLM layer ``prefix`` stays unquantized.

    A fused layer (``qkv_proj``, ``gate_up_proj``) is checked through the names of the
    checkpoint modules it fuses; they must all agree.
    """
    patterns = list(patterns)
    if not patterns:
        return False
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules_mapping.get(leaf)
    if not parts:
        return _matches(prefix, patterns)
    names = [f"{parent}.{p}" if parent else p for p in parts]
    flags = [_matches(n, patterns) for n in names]
    if all(flags) != any(flags):
        raise ValueError(f"flute: the fused vLLM layer {prefix!r} combines {names}, but only some "
                         f"of them are in modules_to_not_convert {patterns}; vLLM needs them all "
                         f"quantized or all unquantized")
    return flags[0]


# -- tensor-parallel checks ------------------------------------------------------------------------
def valid_row_parallel_sizes(in_features: int, bits: int, group_size: int,
                             limit: int = 16) -> list:
    """TP sizes up to ``limit`` at which a row-parallel layer of ``in_features`` can be split."""
    out = []
    for t in range(1, limit + 1):
        if in_features % t:
            continue
        kp = in_features // t
        if t == 1 or ((kp * bits) % 8 == 0 and (group_size == -1 or kp % group_size == 0)):
            out.append(t)
    return out


def check_input_partition(prefix: str, in_features: int, in_per_rank: int, bits: int,
                          group_size: int) -> None:
    """Raise ValueError when splitting K into ``in_per_rank`` columns per rank would cut a byte of
    packed codes or a quantization group (row-parallel layers at TP > 1)."""
    if in_per_rank == in_features:
        return
    tp = in_features // max(in_per_rank, 1)
    ok = valid_row_parallel_sizes(in_features, bits, group_size)
    where = f"layer {prefix!r}" if prefix else "a row-parallel layer"
    if (in_per_rank * bits) % 8:
        raise ValueError(
            f"flute: {where} has in_features={in_features}, split into {in_per_rank} per rank at "
            f"tensor-parallel size {tp}; {in_per_rank} codes of {bits} bits are not a whole "
            f"number of bytes, so the packed rows cannot be sliced. Tensor-parallel sizes that "
            f"work for this layer: {ok}")
    if group_size != -1 and in_per_rank % group_size:
        raise ValueError(
            f"flute: {where} has in_features={in_features}, split into {in_per_rank} per rank at "
            f"tensor-parallel size {tp}, which is not a multiple of the group size {group_size}: "
            f"a quantization group would straddle two ranks. Use a tensor-parallel size t with "
            f"(in_features / t) % {group_size} == 0 (for this layer: {ok}), or a checkpoint "
            f"quantized with a group size that divides {in_per_rank} (or -1)")


def partition_groups(tables: list) -> list:
    """Runs of consecutive logical matrices with equal tables: ``[(first, last_exclusive), ...]``.

    ``tables`` holds one tensor per logical matrix.
    """
    import torch

    runs = []
    start = 0
    for i in range(1, len(tables) + 1):
        if i == len(tables) or not torch.equal(tables[i], tables[start]):
            runs.append((start, i))
            start = i
    return runs


def describe(settings: dict) -> str:
    s = settings
    mode = "pre-quantized" if s["pre_quantized"] else "quantize at load"
    return (f"flute(bits={s['bits']}, group_size={s['group_size']}, codebook={s['codebook']}, "
            f"offsets={s['offsets']}, {mode})")


def num_groups_local(in_per_rank: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_per_rank / group_size)


__all__ = ["register", "parse_settings", "settings_from_json", "settings_from_file", "is_skipped",
           "check_input_partition", "valid_row_parallel_sizes", "partition_groups",
           "DEFAULT_BITS", "DEFAULT_GROUP_SIZE"]


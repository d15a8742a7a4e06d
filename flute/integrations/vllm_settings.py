"""The vLLM-free rules of the flute vLLM plugin: settings, which layers stay unquantized, and how
the canonical format is split across tensor-parallel ranks (see :mod:`flute.integrations.vllm`).

Nothing here imports vLLM, so these rules are tested without it.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

from flute.codebooks import CODEBOOKS
from flute.modules import matches
from flute.spec import QUANT_METHOD, QuantSpec

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64

__all__ = ["QUANT_METHOD", "parse_settings", "settings_from_json", "settings_from_file",
           "is_skipped", "check_input_partition", "valid_row_parallel_sizes", "partition_groups",
           "describe", "DEFAULT_BITS", "DEFAULT_GROUP_SIZE"]


# -- settings --------------------------------------------------------------------------------------
def parse_settings(config: Optional[dict], pre_quantized: bool) -> dict:
    """Normalise a ``quantization_config`` dict (or overrides) into the plugin's settings: the
    :func:`flute.quantize_weight` arguments of :meth:`flute.QuantSpec.quantize_kwargs` plus
    ``modules_to_not_convert`` and ``pre_quantized``.

    Raises ValueError for another quant method, a foreign format version, bad bits/group size, or
    (quantizing at load) an unknown key or a codebook that is not a named table.
    """
    config = dict(config or {})
    config.setdefault("bits", DEFAULT_BITS)
    config.setdefault("group_size", DEFAULT_GROUP_SIZE)
    try:
        spec = QuantSpec.from_dict(config, strict=not pre_quantized)
    except ValueError as e:
        raise ValueError(f"flute: {e}") from None
    if not pre_quantized and config.get("codebook", "nf") not in CODEBOOKS:
        raise ValueError(f"flute: quantizing at load needs a named codebook {CODEBOOKS}, "
                         f"got {config.get('codebook')!r}")
    return dict(spec.quantize_kwargs(), modules_to_not_convert=list(spec.skip),
                pre_quantized=pre_quantized)


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
        return matches(prefix, patterns)
    names = [f"{parent}.{p}" if parent else p for p in parts]
    flags = [matches(n, patterns) for n in names]
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

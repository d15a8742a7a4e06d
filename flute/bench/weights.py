"""Weights for the benchmarks (speed only: their values do not change a kernel's time).

- :func:`random_layout_words` is the one generator of random *kernel-layout* words: every bit of
  the int32 layout is a code bit, so uniform random words are uniform random codes below
  ``2**bits`` (padding atoms never reach a result). The GPU sweep and the end-to-end model use it
  to skip quantizing and packing multi-GB weights.
- :func:`flute_cpu_linear` builds a :class:`flute.QuantLinear` from :func:`flute.testing.random_quantized`
  through ``QuantLinear.from_quantized``, so the module prepares whatever layout its device uses.
- :func:`check_flute` compares a timed op against the float64 reference of :mod:`flute.testing`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_layout_words(bits: int, K: int, N: int, copies: Optional[int], device: torch.device,
                        gen: torch.Generator) -> torch.Tensor:
    """Random int32 kernel-layout words: ``[copies, words]`` (or ``[words]`` when ``copies`` is None)."""
    from ..layout import kernel_layout_shape
    (words,) = kernel_layout_shape(bits, K, N)
    shape = (words,) if copies is None else (copies, words)
    return torch.randint(-2 ** 31, 2 ** 31, shape, dtype=torch.int32, device=device, generator=gen)


def random_flute_weights(N: int, K: int, bits: int, group_size: int, dtype: torch.dtype,
                         device: torch.device, copies: int = 1, seed: int = 0) -> Dict[str, object]:
    """``copies`` random flute weights in the kernel layout: random codes, random positive scales
    around ``1/sqrt(K)``, the NF table."""
    from ..codebooks import get_table
    from ..format import num_groups
    g = generator(device, seed)
    qweight = random_layout_words(bits, K, N, copies, device, g)
    ng = num_groups(group_size, K)
    scales = (torch.rand(copies, N, ng, device=device, generator=g, dtype=torch.float32) + 0.5)
    scales = (scales / math.sqrt(K)).to(dtype)
    table = get_table("nf", bits).to(device=device, dtype=torch.float32)
    return {"qweight": qweight, "scales": scales, "table": table, "bits": bits,
            "group_size": group_size, "N": N, "K": K, "copies": copies}


def flute_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    q, s, t = w["qweight"][i], w["scales"][i], w["table"]
    b, gs, k, n = w["bits"], w["group_size"], w["K"], w["N"]
    return lambda: torch.ops.flute.qgemm(x, q, s, None, t, b, gs, k, n)


def dequant_matmul_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    q, s, t = w["qweight"][i], w["scales"][i], w["table"]
    b, gs, k, n = w["bits"], w["group_size"], w["K"], w["N"]
    return lambda: F.linear(x, torch.ops.flute.dequantize(q, s, None, t, b, gs, k, n))


def check_flute(w: Dict[str, object], i: int, x: torch.Tensor) -> float:
    """Relative error of ``flute_call(w, i, x)`` against the float64 reference of
    :func:`flute.testing.reference_qgemm` on the codes decoded from the layout."""
    from ..layout import from_kernel_layout
    from ..testing import RandomWeight, reference_qgemm, relative_error
    codes = from_kernel_layout(w["qweight"][i], w["bits"], w["K"], w["N"])
    rw = RandomWeight(codes, w["scales"][i].float(), None, w["table"].float())
    return relative_error(flute_call(w, i, x)(), reference_qgemm(x, rw, w["group_size"]))


def random_quant_linear(linear: torch.nn.Module, bits: int, group_size: int, seed: int = 0):
    """A QuantLinear of the shape of ``linear`` (an nn.Linear or a QuantLinear) with random codes
    and scales; scales are chosen so the reconstructed weights have a std near 0.02, like HF's init."""
    from ..codebooks import get_table
    from ..linear import QuantLinear
    ref = linear.weight if isinstance(linear, torch.nn.Linear) else linear.scales
    dev, dtype = ref.device, ref.dtype
    k, n = linear.in_features, linear.out_features
    q = QuantLinear(k, n, bits, group_size, bias=linear.bias is not None, dtype=dtype, device=dev,
                    codebook="nf")
    g = generator(dev, seed)
    q.qweight = random_layout_words(bits, k, n, None, dev, g)
    q.qcodes = q.qcodes.new_empty(0)
    table = get_table("nf", bits).to(dev)
    std = float(table.float().pow(2).mean().sqrt()) or 1.0
    q.scales.copy_((torch.rand(q.scales.shape, device=dev, generator=g) + 0.5) * (0.02 / std))
    q.table.copy_(table)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.data)
    return q


def flute_cpu_linear(N: int, K: int, bits: int, group_size: int, dtype: torch.dtype, seed: int = 0):
    """``(QuantLinear, RandomWeight)``: a prepared CPU layer from :func:`flute.testing.random_quantized`
    (no bias), and the canonical weight for the float64 reference."""
    from ..format import QuantizedWeight, pack_codes
    from ..linear import QuantLinear
    from ..testing import random_quantized
    rw = random_quantized(N, K, bits, group_size, dtype=dtype, seed=seed)
    qw = QuantizedWeight(pack_codes(rw.codes, bits), rw.scales, rw.table, bits, group_size, K, N)
    return QuantLinear.from_quantized(qw), rw


def qgemm_args(q) -> Tuple:
    """The weight arguments of ``torch.ops.flute.qgemm`` for a prepared :class:`flute.QuantLinear`
    (everything after ``x``). The one place that knows how a module feeds the op."""
    if q.qweight is None:
        q.prepare()
    return (q.qweight, q.scales, q.offsets, q.table, q.bits, q.group_size, q.in_features,
            q.out_features)

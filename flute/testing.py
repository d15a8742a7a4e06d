"""Random quantized weights and the float64 reference, shared by the tests and the benchmarks.

Correctness checks compare an implementation of ``torch.ops.flute.qgemm`` (CPU kernel, CUDA kernel,
emulator) against :func:`reference_qgemm` on weights from :func:`random_quantized`: fresh random
codes, scales and table (never zeros), so that a wrong index or a missed element shows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .format import dequantize_codes, num_groups


class RandomWeight(NamedTuple):
    """A quantized weight in the canonical (unpacked) form: ``W = table[codes] * scales (+ offsets)``."""
    codes: torch.Tensor              # uint8 [N, K]
    scales: torch.Tensor             # [N, groups]
    offsets: Optional[torch.Tensor]  # [N, groups] or None
    table: torch.Tensor              # float32 [2**bits]


def random_quantized(n: int, k: int, bits: int, group_size: int, *, offsets: bool = False,
                     dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                     seed: int = 0) -> RandomWeight:
    """Random codes, positive scales around ``1/sqrt(K)`` (so outputs stay O(1) in fp16), small
    offsets and a random table, on the CPU. ``generator`` wins over ``seed`` when given."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    ng = num_groups(group_size, k)
    scales = ((torch.rand(n, ng, generator=g) + 0.5) / k ** 0.5).to(dtype)
    offs = (((torch.rand(n, ng, generator=g) - 0.5) * 0.1 / k ** 0.5).to(dtype) if offsets else None)
    table = torch.randn(2 ** bits, generator=g)
    return RandomWeight(codes, scales, offs, table)


def reference_qgemm(x: torch.Tensor, w: RandomWeight, group_size: int) -> torch.Tensor:
    """``x @ W.T`` in float64 on ``x``'s device (the weight is moved there)."""
    dev = x.device
    wt = dequantize_codes(w.codes.to(dev), w.scales.to(dev),
                          None if w.offsets is None else w.offsets.to(dev), w.table.to(dev),
                          group_size, torch.float64)
    return x.double() @ wt.t()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` when ``out`` holds a NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))

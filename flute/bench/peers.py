"""torch's CPU kernels the CPU benchmark times beside flute: dense ``x @ W.T`` in float32 and
bfloat16 (oneDNN / MKL), and torch's int4 weight-only kernel
(``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``: 4-bit codes,
bf16 (scale, zero) per group, bf16 activations). llama.cpp's kernels are in
:mod:`flute.bench.llamacpp`.

Each builder returns ``copies`` independent weights (rotated so every call reads from memory) and
a function ``calls(x) -> [closure per copy]``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT4_GROUPS = (32, 64, 128, 256)

Calls = Callable[[torch.Tensor], List[Callable[[], torch.Tensor]]]


def dense(N: int, K: int, kernel: str, copies: int, seed: int = 0) -> Tuple[Calls, torch.dtype]:
    """``copies`` dense ``[N, K]`` weights in the kernel's dtype (``fp32`` or ``bf16``)."""
    dtype = DENSE_DTYPES[kernel]
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(N, K, generator=g) * 0.02).to(dtype) for _ in range(copies)]
    return (lambda x: [(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws]), dtype


def torch_int4_support(N: int, K: int, group_size: int) -> Optional[str]:
    """None when torch's int4 CPU kernel runs this shape, else why not."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
            and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return "this torch has no aten::_weight_int4pack_mm_for_cpu"
    if group_size not in INT4_GROUPS:
        return f"torch int4 supports group sizes {INT4_GROUPS}, not {group_size}"
    if K % group_size or K % 2:
        return f"torch int4 needs K % group == 0 (K={K}, group {group_size})"
    return None


def torch_int4(N: int, K: int, group_size: int, copies: int, seed: int = 0
               ) -> Tuple[Calls, torch.dtype]:
    """``copies`` random int4 weights packed for the CPU kernel, bf16 (scale, zero) ``[K/G, N, 2]``."""
    g = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(copies):
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.empty(K // group_size, N, 2, dtype=torch.bfloat16)
        sz[..., 0].uniform_(0.5 / K ** 0.5, 1.5 / K ** 0.5, generator=g)
        sz[..., 1].uniform_(-0.01, 0.01, generator=g)
        ws.append((packed, sz))
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    return (lambda x: [(lambda p=p, s=s: mm(x, p, group_size, s)) for p, s in ws]), torch.bfloat16

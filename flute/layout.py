"""Kernel layout: the device-independent arrangement of codes that the CUDA kernel reads.

PROVISIONAL: this first version only packs the codes of each row into int32 words, eight 4-bit
slots per word, whatever ``bits`` is. The kernel work replaces it with the fragment-ordered,
bit-sliced layout; callers use only the two functions below, whose signatures stay.
"""
from __future__ import annotations

import math

import torch

from .codebooks import check_bits


def to_kernel_layout(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` to the kernel layout (an int32 tensor), on the codes' device."""
    check_bits(bits)
    n, k = codes.shape
    k8 = math.ceil(k / 8) * 8
    c = torch.zeros(n, k8, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * 4
    return (c.view(n, k8 // 8, 8) << shifts).sum(-1, dtype=torch.int32)


def from_kernel_layout(qweight: torch.Tensor, bits: int, in_features: int,
                       out_features: int) -> torch.Tensor:
    """Exact inverse of :func:`to_kernel_layout`: uint8 codes ``[out_features, in_features]``."""
    check_bits(bits)
    shifts = torch.arange(8, dtype=torch.int32, device=qweight.device) * 4
    codes = (qweight.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(qweight.shape[0], -1)[:out_features, :in_features].to(torch.uint8)


def kernel_layout_shape(bits: int, in_features: int, out_features: int) -> tuple:
    """Shape of the int32 kernel-layout tensor for a weight of this size."""
    return (out_features, math.ceil(in_features / 8))
